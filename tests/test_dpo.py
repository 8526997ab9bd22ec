"""DPO trainer on tiny random models: the step-0 identities, the reference options, learning,
and the batch x accumulation invariance."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.data import PreferenceCollator
from rlhfkit.models import tiny_causal_lm
from rlhfkit.parallel import SingleProcess
from rlhfkit.trainers.dpo import (
    DPOConfig,
    Reference,
    build_policy_and_reference,
    dpo_batch_loss,
    pair_logps,
    reference_logps,
    train_dpo,
)
from rlhfkit.trainers.dpo_logps import precompute_reference
from rlhfkit.trainers.reward import prepare_preference_data

WORDS = ["apple", "river", "stone", "cloud", "music", "garden", "window", "forest", "silver", "candle",
         "bridge", "island", "pepper", "rocket", "violin", "meadow", "harbor", "lantern", "marble", "thunder"]


GOOD = ["yes", "sure", "gladly", "certainly", "absolutely", "indeed"]
BAD = ["no", "never", "refuse", "cannot", "nope", "won't"]


def _pairs(n: int, offset: int = 0) -> list[dict]:
    """Separable pairs: the chosen reply is three words of GOOD, the rejected one three of BAD.
    Training pairs (offset 0) take the even-numbered word triples, held-out ones (another offset)
    the odd-numbered: a held-out pair's prompt and both replies are strings training never saw."""
    def words(pool, j):
        return " ".join(pool[j // 6 ** k % 6] for k in range(3))
    triple = [2 * i + (offset != 0) for i in range(n)]
    return [{"prompt": f"Tell me about the {WORDS[(i + offset) % 20]} number {i + offset}.",
             "chosen": words(GOOD, j), "rejected": words(BAD, (5 * j + 1) % 216)} for i, j in enumerate(triple)]


def test_held_out_pairs_are_new_strings():
    train, held = _pairs(32), _pairs(16, offset=100)
    for key in ("prompt", "chosen", "rejected"):
        assert not {p[key] for p in held} & {p[key] for p in train}, key
        assert len({p[key] for p in held}) == len(held), key


@pytest.fixture()
def setup(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny-as-run" / "model"  # laid out like a run dir, for _final_weights
    tiny_causal_lm(tokenizer, seed=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for name, rows in (("train.jsonl", _pairs(32)), ("eval.jsonl", _pairs(16, offset=100))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, model_dir


def _cfg(tmp_path, model_dir, *overrides):
    return load_config(DPOConfig, overrides=[
        f"model.name={model_dir}", f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}",
        f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "data.max_length=64", *overrides])


def test_step0_loss_is_ln2_and_rewards_zero(setup, tokenizer):
    tmp_path, model_dir = setup
    cfg = _cfg(tmp_path, model_dir)
    train, _, _ = prepare_preference_data(cfg, tokenizer)
    policy, ref = build_policy_and_reference(cfg, tokenizer)
    assert ref.model is not policy  # full fine-tuning: a frozen copy
    chunk = train[:8]
    loss, sums = dpo_batch_loss(policy, ref, chunk, PreferenceCollator(tokenizer.pad_token_id), cfg.dpo,
                                normalizer=len(chunk), device="cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert abs(float(sums[k])) < 1e-6


def test_precomputed_reference_equals_live(setup, tokenizer):
    tmp_path, model_dir = setup
    cfg = _cfg(tmp_path, model_dir)
    train, _, _ = prepare_preference_data(cfg, tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    policy, ref = build_policy_and_reference(cfg, tokenizer)
    examples = [dict(ex) for ex in train[:12]]
    precompute_reference(examples, ref, collator, 5, SingleProcess())  # other padding widths
    batch = collator(examples)
    live = ref.logps(batch)
    stored = reference_logps(examples, batch, None, average=False)
    for a, b in zip(live, stored):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def test_precompute_and_lora_keep_one_copy_of_the_weights(setup, tokenizer):
    tmp_path, model_dir = setup
    policy, ref = build_policy_and_reference(_cfg(tmp_path, model_dir, "dpo.precompute_ref_logps=true"), tokenizer)
    assert ref.model is policy and not ref.adapters_off  # the untrained policy is the reference

    cfg = _cfg(tmp_path, model_dir, "model.lora.enabled=true", "model.lora.r=4")
    policy, ref = build_policy_and_reference(cfg, tokenizer)
    assert ref.model is policy and ref.adapters_off
    base_params = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert len({p.data_ptr() for p in base_params}) == len(base_params)
    assert not any(p.requires_grad for p in base_params)
    # Move the adapters: the policy changes, the reference (adapters disabled) does not.
    train, _, _ = prepare_preference_data(cfg, tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)(train[:4])
    before = ref.logps(batch)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    torch.testing.assert_close(ref.logps(batch), before)
    assert not torch.allclose(Reference(policy).logps(batch)[0], before[0])


def test_dpo_learns_a_separable_preference(setup):
    tmp_path, model_dir = setup
    cfg = _cfg(tmp_path, model_dir, "optim.lr=3e-3", "optim.warmup_ratio=0", "optim.schedule=constant",
               "train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=12", "dpo.beta=0.5")
    metrics = train_dpo(cfg)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start, end = lines[0], lines[-1]
    assert start["eval/rewards/accuracy"] == 0.0 and abs(start["eval/rewards/margin"]) < 1e-6
    assert float(metrics["eval/rewards/accuracy"]) >= 0.9  # held-out prompts never seen in training
    assert end["eval/rewards/margin"] > 0.5 and end["eval/loss"] < 0.5 * math.log(2)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "dpo_results.json").read_text())["pairs"] == {"train": 32, "eval": 16}


@pytest.mark.parametrize("loss", ["ipo", "cdpo", "robust", "hinge"])
def test_every_dpo_loss_type_learns_the_held_out_preference(setup, loss):
    """IPO, conservative DPO and robust DPO (label smoothing 0.1) and SLiC's hinge each learn what
    the sigmoid loss does: held-out pairs, all ranked wrong or tied at step 0, ranked right at the
    end, and the held-out loss well below its start (cDPO's floor with smoothing 0.1 is 0.47 of
    its start, so 0.75)."""
    tmp_path, model_dir = setup
    smoothing = ["dpo.label_smoothing=0.1"] if loss in ("cdpo", "robust") else []
    cfg = _cfg(tmp_path, model_dir, "optim.lr=3e-3", "optim.warmup_ratio=0", "optim.schedule=constant",
               "train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=12", "dpo.beta=0.5",
               f"dpo.loss_type={loss}", *smoothing)
    metrics = train_dpo(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/loss" in line]
    assert evals[0]["eval/rewards/accuracy"] == 0.0
    assert float(metrics["eval/rewards/accuracy"]) >= 0.9, evals[-1]
    assert evals[-1]["eval/loss"] < 0.75 * evals[0]["eval/loss"], (evals[0], evals[-1])
    assert evals[-1]["eval/rewards/margin"] > 0.1


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_batch8_equals_batch1_times_accumulation8(setup):
    tmp_path, model_dir = setup
    # adam_eps=1 makes Adam's first steps ~ lr * grad, so parameter differences track gradient
    # differences instead of being rounded to +-lr by the normalisation.
    common = ["optim.lr=0.05", "optim.adam_eps=1.0", "optim.warmup_ratio=0", "optim.schedule=constant",
              "train.batch_size=8", "train.max_steps=2", "data.eval=", "data.eval_fraction=0"]
    results = {}
    for micro in (8, 1):
        out = tmp_path / f"run-{micro}"
        cfg = _cfg(tmp_path, model_dir, *common, f"train.micro_batch_size={micro}", f"train.output_dir={out}")
        results[micro] = (train_dpo(cfg), _final_weights(out))
    (m8, w8), (m1, w1) = results[8], results[1]
    assert float(m8["train/loss"]) == pytest.approx(float(m1["train/loss"]), abs=1e-6)
    init = _final_weights(model_dir.parent)
    moved = 0.0
    for k in w8:
        torch.testing.assert_close(w8[k], w1[k], atol=2e-6, rtol=1e-5)
        moved = max(moved, (w8[k] - init[k]).abs().max().item())
    assert moved > 1e-3  # the runs did move the weights


def test_resume_continues_to_the_same_weights(setup, monkeypatch):
    import rlhfkit.training.supervised as supervised

    ran = []  # the steps each train_dpo call really executed
    real_step = supervised.supervised_step

    def counting_step(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def counted(i):
            ran.append(i)
            return step(i)

        return counted

    monkeypatch.setattr(supervised, "supervised_step", counting_step)
    tmp_path, model_dir = setup
    common = ["optim.lr=1e-3", "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=4",
              "dpo.precompute_ref_logps=true", "data.eval=", "data.eval_fraction=0"]
    full = tmp_path / "full"
    train_dpo(_cfg(tmp_path, model_dir, *common, f"train.output_dir={full}"))
    part = tmp_path / "part"
    # First run stops after 2 steps with a checkpoint; the second resumes to step 4.
    train_dpo(_cfg(tmp_path, model_dir, *common, "train.max_steps=4", "train.save_every=2",
                   f"train.output_dir={part}"))
    import shutil

    shutil.rmtree(part / "model")
    shutil.rmtree(part / "checkpoints" / "step-00000004", ignore_errors=True)
    ran.clear()
    train_dpo(_cfg(tmp_path, model_dir, *common, "train.resume=true", f"train.output_dir={part}"))
    assert ran == [2, 3]  # continued from the step-2 checkpoint: steps 0 and 1 were not redone
    a, b = _final_weights(full), _final_weights(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


def test_sft_first_then_dpo_anchors_on_the_sft_model(setup):
    tmp_path, model_dir = setup
    cfg = _cfg(tmp_path, model_dir, "sft_first.enabled=true", "sft_first.max_steps=3", "sft_first.lr=1e-2",
               "train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=1", "train.eval_every=1",
               "train.select_best=eval/rewards/margin")  # DPO's metric; the SFT phase keeps its best by eval/loss
    train_dpo(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "sft" / "sft_results.json").read_text())["best"]["metric"] == "eval/loss"
    assert json.loads((run / "dpo_results.json").read_text())["best"]["metric"] == "eval/rewards/margin"
    assert (run / "sft" / "model" / "config.json").is_file()
    first = json.loads((run / "sft" / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"][-1] == {"role": "assistant", "content": _pairs(1)[0]["chosen"]}  # the chosen side
    step0 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    # The SFT model is both the start and the reference: DPO starts exactly at ln 2, and the SFT
    # stage did change the model (its chosen log-probs are far above the random model's).
    assert step0["step"] == 0 and step0["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step0["eval/logps/chosen"] > step0["eval/logps/rejected"] + 1.0


@pytest.mark.parametrize("line, field, fragment", [
    ('{"prompt": "x", "chosen": "a", "rejected": ', None, "invalid JSON"),
    (json.dumps({"prompt": "x", "chosen": "a"}), "rejected", "missing"),
    (json.dumps({"prompt": "x", "chosen": 5, "rejected": "b"}), "chosen", "got int"),
    (json.dumps({"prompt": "x", "chosen": " ", "rejected": "b"}), "chosen", "empty or whitespace-only text"),
    (json.dumps({"prompt": "x", "chosen": "word " * 100, "rejected": "b"}), "chosen", "longer than max_length=64"),
])
def test_bad_pairs_name_file_line_and_field_before_any_model_loads(setup, monkeypatch, line, field, fragment):
    import transformers

    from rlhfkit.data import DataError

    tmp_path, model_dir = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in _pairs(2)) + line + "\n")

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the data was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    with pytest.raises(DataError) as info:
        train_dpo(_cfg(tmp_path, model_dir, f"data.train={bad}"))
    msg = str(info.value)
    assert msg.startswith(f"{bad}:3: ") and (field is None or f"field '{field}'" in msg) and fragment in msg, msg


def test_shared_prompt_pairs_match_separate_rows(setup, tokenizer):
    """One packed sequence per pair (prompt once) gives the rows' sequence log-probs and gradients."""
    tmp_path, model_dir = setup
    cfg = _cfg(tmp_path, model_dir)
    train, _, _ = prepare_preference_data(cfg, tokenizer)
    policy, _ = build_policy_and_reference(cfg, tokenizer)
    chunk = train[:6]
    rows = PreferenceCollator(tokenizer.pad_token_id)(chunk)
    packed = PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(chunk)
    assert "prompt_lengths" in packed and "prompt_lengths" not in rows
    grads = []
    for batch in (rows, packed):
        policy.zero_grad()
        c, r = pair_logps(policy, batch)
        (c.sum() - 2 * r.sum()).backward()
        grads.append(([c.detach(), r.detach()], [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
    (a_lp, a_g), (b_lp, b_g) = grads
    for x, y in zip(a_lp, b_lp):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-5)
    for x, y in zip(a_g, b_g):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)
    # the trainer's collator packs by default
    assert cfg.dpo.share_prompt


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_pair_logps_at_a_temperature_are_those_of_the_tempered_softmax(setup, tokenizer, temperature, share_prompt):
    """The sequence log-probs, the reference's and the precomputed ones, are sums over the response
    tokens of log softmax(logits / T) (online DPO's pairs are samples of pi_T), against a naive
    full-vocabulary computation in float64."""
    tmp_path, model_dir = setup
    cfg = _cfg(tmp_path, model_dir, f"dpo.temperature={temperature}")
    train, _, _ = prepare_preference_data(cfg, tokenizer)
    policy, ref = build_policy_and_reference(cfg, tokenizer)
    chunk = [dict(ex) for ex in train[:6]]
    rows = PreferenceCollator(tokenizer.pad_token_id)(chunk)
    with torch.no_grad():
        logits = policy(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits.double()
    lp = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, rows["input_ids"][:, 1:, None]).squeeze(-1)
    naive = (lp * rows["loss_mask"][:, 1:]).sum(-1).float()
    batch = PreferenceCollator(tokenizer.pad_token_id, share_prompt=share_prompt)(chunk)
    c, r = pair_logps(policy, batch, temperature=temperature)
    torch.testing.assert_close(torch.cat([c, r]).detach(), naive, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(torch.cat(ref.logps(batch, temperature=temperature)), naive, atol=2e-4, rtol=1e-5)
    precompute_reference(chunk, ref, PreferenceCollator(tokenizer.pad_token_id), 4, SingleProcess(),
                         temperature=temperature)
    torch.testing.assert_close(torch.cat(reference_logps(chunk, batch, None, False)), naive, atol=2e-4, rtol=1e-5)
    loss, _ = dpo_batch_loss(policy, ref, chunk, PreferenceCollator(tokenizer.pad_token_id), cfg.dpo, 6, "cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # pi = pi_ref at any temperature


def _moved_policy_losses(setup, tokenizer, *overrides):
    """(trainer loss, hand-computed inputs) on a policy moved away from its reference."""
    tmp_path, model_dir = setup
    cfg = _cfg(tmp_path, model_dir, *overrides)
    train, _, _ = prepare_preference_data(cfg, tokenizer)
    policy, ref = build_policy_and_reference(cfg, tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    chunk = train[:6]
    loss, _ = dpo_batch_loss(policy, ref, chunk, PreferenceCollator(tokenizer.pad_token_id), cfg.dpo,
                             normalizer=len(chunk), device="cpu")
    rows = PreferenceCollator(tokenizer.pad_token_id)(chunk)
    with torch.no_grad():
        pc, pr = pair_logps(policy, rows)
        rc, rr = pair_logps(ref.model, rows)
    n = rows["loss_mask"].sum(-1).float()
    nc, nr = n[:len(chunk)], n[len(chunk):]
    return cfg, float(loss.detach()), (pc, pr, rc, rr, nc, nr)


def test_ipo_defaults_to_length_averaged_logps_like_trl(setup, tokenizer):
    cfg, loss, (pc, pr, rc, rr, nc, nr) = _moved_policy_losses(setup, tokenizer, "dpo.loss_type=ipo", "dpo.beta=0.5")
    assert cfg.dpo.average_logps == "auto" and cfg.dpo.average
    h_avg = (pc - rc) / nc - (pr - rr) / nr  # TRL: each response's log-ratio over its own token count
    h_sum = (pc - rc) - (pr - rr)
    assert loss == pytest.approx(float(((h_avg - 1.0) ** 2).mean()), abs=1e-5)
    assert abs(loss - float(((h_sum - 1.0) ** 2).mean())) > 1e-3  # the summed form is another number
    cfg, loss_sum, _ = _moved_policy_losses(setup, tokenizer, "dpo.loss_type=ipo", "dpo.beta=0.5",
                                            "dpo.average_logps=false")
    assert loss_sum == pytest.approx(float(((h_sum - 1.0) ** 2).mean()), abs=1e-4)


def test_robust_dpo_loss_type_is_wired(setup, tokenizer):
    e, beta = 0.2, 0.1
    cfg, loss, (pc, pr, rc, rr, _, _) = _moved_policy_losses(
        setup, tokenizer, "dpo.loss_type=robust", f"dpo.label_smoothing={e}")
    assert not cfg.dpo.average  # auto: sums for every loss but IPO
    z = beta * ((pc - rc) - (pr - rr))
    ls = torch.nn.functional.logsigmoid
    want = ((-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e)).mean()
    assert loss == pytest.approx(float(want), abs=1e-5)
    cdpo = (-(1 - e) * ls(z) - e * ls(-z)).mean()  # conservative DPO is a different number
    assert abs(loss - float(cdpo)) > 1e-4
