"""trl's PPO (``trl.experimental.ppo.PPOTrainer``, trl 1.12.0) on the same weights, prompts, batch and response
length as one of our trainers, one PPO epoch, timed one iteration at a time.

trl runs its whole loop inside ``train()``; one iteration is one ``train()`` call over one batch
(``total_episodes = batch``), timed from its ``on_train_begin`` callback to the return of ``train()``. That leaves out
only trl's one-off set-up of a call (a generation config, empty statistics tensors) and keeps everything a long run
repeats every iteration, its ``gc.collect()`` included.
"""

from __future__ import annotations

import copy
import tempfile
import time

from transformers import LlamaForSequenceClassification, PrinterCallback, TrainerCallback

from repo_exp.train import Trainer


class _IterationClock(TrainerCallback):
    def __init__(self) -> None:
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()


def _sequence_classifier(score_model, template_policy) -> LlamaForSequenceClassification:
    """Our score model (trunk + ``score_head``) as the ``LlamaForSequenceClassification`` trl reads through
    ``model.model`` and ``model.score``: the same weights."""
    config = copy.deepcopy(template_policy.config)
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    state = {k: v for k, v in score_model.state_dict().items() if k.startswith("model.")}
    state["score.weight"] = score_model.score_head.weight.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the score model does not map onto LlamaForSequenceClassification: missing {missing}, "
                         f"unexpected {unexpected}")
    return model


class TrlPPO:
    """A ``PPOTrainer`` built from the initial weights of ``ours`` (call before ``ours`` takes a step), with trl's
    ``bf16`` switch (accelerate's autocast) and the attention kernel ``attn`` of all four models; with ``lora``
    (``rank``, ``alpha``, ``target_modules``) trl's ``peft_config``: adapters on the policy, the reference its base.

    trl builds its masks from the pad id (``query_responses != pad_token_id``): a tokenizer that pads with its EOS
    (SmolLM2's ``<|im_end|>``, which its chat template also writes into every prompt) would have trl mask prompt
    tokens out, so trl's copy of such a tokenizer pads with its unknown token instead (ours builds masks from
    lengths and keeps EOS as pad)."""

    def __init__(self, ours: Trainer, bf16: bool = False, attn: str = "sdpa",
                 lora: dict | None = None) -> None:
        from datasets import Dataset
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        t = ours.config.trainer
        batch = t.prompts_per_step * t.samples_per_prompt
        tokenizer = copy.deepcopy(ours.models.tokenizer)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        policy = copy.deepcopy(ours.models.policy.module)

        policy.set_attn_implementation(attn)  # the score models below copy the policy's config, kernel included
        reward = _sequence_classifier(ours.models.reward.model, policy)
        value = _sequence_classifier(ours.models.reward.model, policy)  # critic from the reward model, as ours
        prompts = Dataset.from_dict({"input_ids": [list(ids) for ids in ours.encoder.ids]})
        self.clock = _IterationClock()
        args = PPOConfig(
            output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            local_rollout_forward_batch_size=batch,
            num_mini_batches=1,
            num_ppo_epochs=1,
            total_episodes=batch,  # one iteration per train() call
            response_length=t.max_new_tokens,
            temperature=t.temperature,
            stop_token="eos",
            kl_coef=ours.config.ppo.kl_coeff,
            learning_rate=ours.config.optimizer.actor.lr,
            lr_scheduler_type="constant",
            bf16=bf16,
            gradient_checkpointing=False,  # ours does not checkpoint either: the same passes on both sides
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            seed=ours.config.seed,
            dataloader_num_workers=0,
        )
        peft_config = None
        if lora is not None:
            from peft import LoraConfig

            peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none",
                                     target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
        self.trainer = PPOTrainer(
            args=args, processing_class=tokenizer, model=policy,
            ref_model=None if peft_config is not None else copy.deepcopy(policy), reward_model=reward,
            train_dataset=prompts, value_model=value, eval_dataset=prompts, callbacks=[self.clock],
            peft_config=peft_config,
        )
        self.trainer.remove_callback(PrinterCallback)  # it prints every iteration's metrics
        self.parameters = sum(p.numel() for p in policy.parameters())

    def info(self) -> dict[str, int]:
        return {"parameters": self.parameters}

    def iteration(self) -> dict[str, float]:
        """Seconds of one PPO iteration."""
        self.trainer.train()
        return {"seconds": time.perf_counter() - self.clock.started}
