"""The TRL side of the rlhfkit-vs-TRL benchmark (`trl_worker.py`): TRL's trainers built from the
parsed rlhfkit config of a job, with the hooks that time their steps.

TRL is imported inside the functions, so that the rlhfkit worker never loads it.
"""

from __future__ import annotations

import os
import resource

from rlhfkit.registry import COMMANDS


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rlhfkit_config(method: str, spec: dict):
    """The parsed rlhfkit config of the job (the TRL side derives its arguments from it too)."""
    from rlhfkit.config import load_config

    return load_config(COMMANDS[method].config_class(), spec["config"], spec["overrides"])



def _common_args(cfg, out_dir: str, max_steps: int) -> dict:
    """TrainingArguments both frameworks agree on: fp32 on CPU, AdamW with rlhfkit's
    hyperparameters, constant LR, gradient clipping, no checkpointing, log every step."""
    o = cfg.optim
    return dict(
        output_dir=out_dir, seed=cfg.train.seed, max_steps=max_steps,
        learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_epsilon=o.adam_eps, max_grad_norm=o.max_grad_norm,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )


class _TRLSync:
    """TrainerCallback (built lazily so that transformers is imported only here)."""

    @staticmethod
    def make(sync, metric: str):
        from transformers import TrainerCallback

        class StepSync(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                sync.ready()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step % sync.every == 0 and sync.done < sync.total:
                    if sync.step_done():
                        control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):
                logs = logs or {}
                if logs.get(metric) is not None:
                    it = -(-state.global_step // sync.every)  # the iteration this optimizer step belongs to
                    if not any(c["step"] == it for c in sync.curve):
                        sync.curve.append({"step": it, metric: float(logs[metric])})

        return StepSync()


def _sft_dataset(cfg):
    from datasets import Dataset

    from rlhfkit.data import load_sft
    from rlhfkit.data.sources import load_sources

    rows = []
    for ex in load_sources(cfg.data.train, "sft", load_sft):
        m = ex.messages
        rows.append({"prompt": m[:-1], "completion": m[-1:]})
    return Dataset.from_list(rows)


def _preference_dataset(cfg):
    from datasets import Dataset

    from rlhfkit.data import load_preference
    from rlhfkit.data.sources import load_sources

    pairs = load_sources(cfg.data.train, "preference", load_preference)
    if cfg.data.limit:  # the first n pairs, as rlhfkit's trainers take them (the jobs hold none out)
        pairs = pairs[:cfg.data.limit]
    return Dataset.from_list([
        {"prompt": ex.prompt, "chosen": [{"role": "assistant", "content": ex.chosen}],
         "rejected": [{"role": "assistant", "content": ex.rejected}]} for ex in pairs])


def run_trl(method: str, spec: dict, sync) -> None:
    import torch
    import trl

    sync.info["trl"] = trl.__version__

    from rlhfkit.models import load_tokenizer

    model_dir = spec["model_dir"]
    out_dir = spec["out_dir"]
    tok = load_tokenizer(model_dir)  # the same tokenizer object rlhfkit uses (pad = <|endoftext|>)
    steps = sync.total
    init_kwargs = {"dtype": "float32"}

    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        cfg = rlhfkit_config("sft", spec)
        t = cfg.train
        args = SFTConfig(**_common_args(cfg, out_dir, steps), per_device_train_batch_size=t.micro_batch_size,
                         gradient_accumulation_steps=t.batch_size // t.micro_batch_size,
                         max_length=cfg.data.max_length, packing=False, completion_only_loss=True,
                         shuffle_dataset=False, train_sampling_strategy="sequential", model_init_kwargs=init_kwargs)
        trainer = SFTTrainer(model=model_dir, args=args, train_dataset=_sft_dataset(cfg), processing_class=tok,
                             callbacks=[_TRLSync.make(sync, "loss")])
    elif method == "rm":
        from trl import RewardConfig, RewardTrainer

        cfg = rlhfkit_config("rm", spec)
        t = cfg.train
        args = RewardConfig(**_common_args(cfg, out_dir, steps), per_device_train_batch_size=t.micro_batch_size,
                            gradient_accumulation_steps=t.batch_size // t.micro_batch_size,
                            max_length=cfg.data.max_length, disable_dropout=True,
                            center_rewards_coefficient=cfg.center_rewards_coef or None,
                            train_sampling_strategy="sequential", model_init_kwargs=init_kwargs)
        trainer = RewardTrainer(model=model_dir, args=args, train_dataset=_preference_dataset(cfg),
                                processing_class=tok, callbacks=[_TRLSync.make(sync, "loss")])
    elif method == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = rlhfkit_config("dpo", spec)
        t, d = cfg.train, cfg.dpo
        args = DPOConfig(**_common_args(cfg, out_dir, steps), per_device_train_batch_size=t.micro_batch_size,
                         gradient_accumulation_steps=t.batch_size // t.micro_batch_size,
                         max_length=cfg.data.max_length, beta=d.beta,
                         loss_type={"sigmoid": "sigmoid", "cdpo": "sigmoid", "ipo": "ipo", "hinge": "hinge"}[d.loss_type],
                         label_smoothing=d.label_smoothing, precompute_ref_log_probs=d.precompute_ref_logps,
                         disable_dropout=True, train_sampling_strategy="sequential", model_init_kwargs=init_kwargs)
        trainer = DPOTrainer(model=model_dir, args=args, train_dataset=_preference_dataset(cfg),
                             processing_class=tok, callbacks=[_TRLSync.make(sync, "loss")])
    elif method == "grpo":
        trainer = _trl_grpo(spec, sync, tok, init_kwargs)
    elif method == "ppo":
        trainer = _trl_ppo(spec, sync, tok)
    else:
        raise ValueError(method)

    torch.manual_seed(spec.get("seed", 0))
    trainer.train()
    sync.send(event="result", curve=sync.curve, rss_mb=peak_rss_mb())
    sync.w.close()
    os._exit(0)


def _trl_grpo(spec: dict, sync, tok, init_kwargs: dict):
    import time as _t

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.data import load_prompts
    from rlhfkit.judges.rewards import build_reward_fn, prompt_text
    from rlhfkit.data.sources import resolve_source

    cfg = rlhfkit_config("grpo", spec)
    t, r = cfg.train, cfg.rollout
    rows = t.batch_size * r.n
    opt_steps = (rows // cfg.mini_batch_size) * cfg.ppo_epochs  # optimizer steps per iteration
    sync.every = opt_steps
    if cfg.kl_in_reward:
        raise ValueError("TRL's GRPO has no KL-in-reward mode")
    agg = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}.get(cfg.loss_agg)
    if agg is None:
        raise ValueError(f"loss_agg {cfg.loss_agg} has no TRL GRPO equivalent")
    peft_config = _lora_config(cfg.model.lora, "CAUSAL_LM") if cfg.model.lora.enabled else None
    args = GRPOConfig(
        **_common_args(cfg, spec["out_dir"], sync.total * opt_steps),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=cfg.mini_batch_size // t.micro_batch_size,
        generation_batch_size=rows, num_generations=r.n, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, beta=cfg.kl_coef, num_iterations=cfg.ppo_epochs,
        epsilon=cfg.clip_eps, epsilon_high=cfg.clip_eps_high or cfg.clip_eps, loss_type=agg,
        scale_rewards="group" if cfg.scale == "std" else "none", shuffle_dataset=False, disable_dropout=True,
        mask_truncated_completions=False, log_completions=False, model_init_kwargs=init_kwargs,
    )
    reward_fn = build_reward_fn(cfg.reward.spec, tokenizer=tok)

    def reward(prompts, completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward_fn([prompt_text(p) for p in prompts], [s.strip() for s in texts], messages=prompts)

    reward.__name__ = cfg.reward.spec.replace(":", "_")
    examples = load_prompts(resolve_source(cfg.prompts.train, "prompts"))
    ds = Dataset.from_list([{"prompt": ex.prompt} for ex in examples])
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[reward], args=args, train_dataset=ds,
                          processing_class=tok, peft_config=peft_config,
                          callbacks=[_TRLSync.make(sync, "reward")])

    gen_orig, gs_orig = trainer._generate, trainer._generate_and_score_completions

    def _generate(*a, **k):
        t0 = _t.perf_counter()
        out = gen_orig(*a, **k)
        sync.add_phase("gen", _t.perf_counter() - t0)
        prompt_ids, completion_ids = out[0], out[1]
        sync.add_tokens(rows=len(completion_ids), prompt=sum(len(p) for p in prompt_ids),
                        response=sum(len(c) for c in completion_ids))
        return out

    def _generate_and_score(*a, **k):
        t0 = _t.perf_counter()
        gen_before = sync.phases.get("gen", 0.0)
        out = gs_orig(*a, **k)
        sync.add_phase("score", _t.perf_counter() - t0 - (sync.phases.get("gen", 0.0) - gen_before))
        return out

    trainer._generate, trainer._generate_and_score_completions = _generate, _generate_and_score
    return trainer


def _lora_config(section, task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=section.target_modules, task_type=task_type)


def _trl_ppo(spec: dict, sync, tok):
    import time as _t

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhfkit.data import load_prompts, render_prompt_ids
    from rlhfkit.judges.rewards import find_rm_dir
    from rlhfkit.data.sources import resolve_source

    cfg = rlhfkit_config("ppo", spec)
    t, r = cfg.train, cfg.rollout
    if r.n != 1:
        raise ValueError("TRL's PPO samples one response per prompt (rollout.n must be 1)")
    if not cfg.reward.spec.startswith("rm:"):
        raise ValueError("TRL's PPO needs a reward model (reward.spec=rm:DIR)")
    rows = t.batch_size
    rm_dir = str(find_rm_dir(cfg.reward.spec[3:]))
    critic_src = cfg.critic_model or (rm_dir if cfg.critic_init == "reward" else spec["model_dir"])
    tok.padding_side = "left"  # TRL's PPO pads queries with DataCollatorWithPadding
    f32 = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=f32)
    ref = None if cfg.model.lora.enabled else AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=f32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=f32)
    value_model = AutoModelForSequenceClassification.from_pretrained(critic_src, num_labels=1, dtype=f32)
    for m in (reward_model, value_model):
        m.config.pad_token_id = tok.pad_token_id
    if critic_src == spec["model_dir"]:  # rlhfkit's critic_init=policy starts from V = 0
        with torch.no_grad():
            value_model.score.weight.zero_()
    peft_config = None
    if cfg.model.lora.enabled:
        from peft import get_peft_model

        peft_config = _lora_config(cfg.model.lora, "CAUSAL_LM")
        value_model = get_peft_model(value_model, _lora_config(cfg.model.lora, "SEQ_CLS"))

    examples = load_prompts(resolve_source(cfg.prompts.train, "prompts"))
    ids = [render_prompt_ids(tok, ex.prompt) for ex in examples]
    ids = [x for x in ids if len(x) <= cfg.prompts.max_prompt_length]
    ds = Dataset.from_dict({"input_ids": ids})
    args = PPOConfig(
        **_common_args(cfg, spec["out_dir"], -1),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=rows // t.micro_batch_size,
        num_mini_batches=rows // cfg.mini_batch_size, num_ppo_epochs=cfg.ppo_epochs,
        total_episodes=rows * sync.total, local_rollout_forward_batch_size=r.micro_batch_size or rows,
        response_length=r.max_new_tokens, stop_token="eos", temperature=r.temperature,
        kl_coef=cfg.kl.coef, kl_estimator=cfg.kl.kind if cfg.kl.kind in ("k1", "k3") else "k1",
        cliprange=cfg.clip_eps, vf_coef=cfg.vf_coef, cliprange_value=cfg.value_clip_eps or 1e9,
        gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=False, missing_eos_penalty=None,
        num_sample_generations=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward_model,
                         train_dataset=ds, value_model=value_model, eval_dataset=ds.select(range(rows)),
                         peft_config=peft_config, callbacks=[_TRLSync.make(sync, "objective/scores")])

    gen_orig, fwd_orig = ppo_mod.batch_generation, ppo_mod.forward
    eos = tok.eos_token_id

    def batch_generation(model, queries, *a, **k):
        t0 = _t.perf_counter()
        out = gen_orig(model, queries, *a, **k)
        sync.add_phase("gen", _t.perf_counter() - t0)
        sync.phases["_gen_end"] = _t.perf_counter() - sync.t0
        resp = out[0][:, queries.shape[1]:]
        is_eos = resp == eos
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], resp.shape[1],
                                                                                          dtype=torch.long))
        sync.add_tokens(rows=queries.shape[0], prompt=int((queries != tok.pad_token_id).sum()),
                        response=int(lengths.sum()))
        return out

    def forward(model, *a, **k):
        if isinstance(model, ppo_mod.PolicyAndValueWrapper) and "score" not in sync.phases:
            now = _t.perf_counter() - sync.t0  # the first training forward: scoring is over
            sync.add_phase("score", now - sync.phases.get("_gen_end", now))
        return fwd_orig(model, *a, **k)

    ppo_mod.batch_generation, ppo_mod.forward = batch_generation, forward
    return trainer
