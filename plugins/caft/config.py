"""Options of the ``caft`` plugin (Concept-Aware Fine-Tuning; reference code: michaelchen-lab/caft-llm)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hf_tokplug.plugin import PluginConfig

Schedule = Literal["rsine", "sine", "linear", "linear_up", "constant"]


class CAFTConfig(PluginConfig):
    """CAFT: auxiliary heads predicting tokens t+2..t+1+n, trained in two stages.

    Args:
        stage: ``heads`` (Stage A: the base model is frozen and only the heads train, with alpha 1 and a constant
            schedule by default; run once per base model) or ``finetune`` (Stage B: the task fine-tuning with the
            heads' losses added, heads frozen by default).
        num_heads: auxiliary heads (the paper's n - 1 = 4). 0 disables the plugin.
        head_type: ``transformer`` (a copy of one of the model's decoder layers plus its final norm) or ``linear``
            (x + SiLU(W x), W = 0 at init).
        init_layer: which decoder layer the transformer heads copy (Python index; -2 = second-to-last, the
            reference's choice).
        unembedding: ``shared`` (the model's LM head) or ``separate`` (a copy per head, trained with the head).
        beta: per-head decay: head i is weighted beta^i (0.8). Also the weights of the selection metric.
        alpha: overall weight of the auxiliary losses; default 1.0 in stage ``heads``, 0.01 in ``finetune``.
            0 disables the plugin (the run is exactly plain SFT).
        schedule: s(step) multiplying alpha. ``rsine`` = sin((T - t)/T * pi/2), fading 1 -> 0 (finetune default);
            ``linear`` = (T - t)/T; ``constant`` = 1 (heads default); ramp-up variants ``sine`` = sin(t/T * pi/2)
            and ``linear_up`` = t/T. T is the trainer's max_steps.
        heads_path: folder or Hub repo with ``caft_heads.safetensors`` from a Stage A run (finetune stage).
        train_heads: in ``finetune``, also train the heads (default: frozen).
        train_lm_head: in ``finetune`` without an adapter, train the LM head too (default: frozen, as in the paper).
        keep_heads: save the heads beside the final model (restored by ``hf_tokplug.from_pretrained``); by default
            they are dropped and a plain HF model is saved. Stage ``heads`` always saves them.
        chunk_size: positions per chunk when a head's logits are computed (memory: chunk x vocab).
        checkpoint_heads: recompute each head's layer in backward instead of storing its activations (one extra
            head forward per step; without it, n transformer heads keep n decoder layers' activations).
        roles: the batch rows whose tokens train the heads (``TokenBatch.roles``): supervised examples and a
            preference pair's chosen completions by default; add ``rejected`` or ``policy`` deliberately.
    """

    stage: Literal["heads", "finetune"] = Field("finetune", description="heads (Stage A) or finetune (Stage B).")
    num_heads: int = Field(4, ge=0, description="Auxiliary heads (n - 1); 0 disables the plugin.")
    head_type: Literal["transformer", "linear"] = Field("transformer", description="Head architecture.")
    init_layer: int = Field(-2, description="Decoder layer the transformer heads copy.")
    unembedding: Literal["shared", "separate"] = Field("shared", description="Share the LM head or copy it per head.")
    beta: float = Field(0.8, gt=0.0, description="Head i weight beta^i.")
    alpha: float | None = Field(None, ge=0.0, description="Auxiliary loss weight (heads: 1.0, finetune: 0.01).")
    schedule: Schedule | None = Field(None, description="Weight schedule (heads: constant, finetune: rsine).")
    heads_path: str | None = Field(None, description="Stage A heads: folder or Hub repo.")
    train_heads: bool = Field(False, description="Train the heads in the finetune stage.")
    train_lm_head: bool = Field(False, description="Train the LM head in full fine-tuning.")
    keep_heads: bool = Field(False, description="Save the heads with the final model.")
    chunk_size: int = Field(1024, ge=1, description="Positions per logits chunk.")
    checkpoint_heads: bool = Field(True, description="Recompute head layers in backward to save memory.")
    roles: list[Literal["sft", "chosen", "rejected", "policy"]] = Field(
        default_factory=lambda: ["sft", "chosen"], min_length=1, description="Batch rows whose tokens train the heads.")

    @property
    def weight(self) -> float:
        return self.alpha if self.alpha is not None else (1.0 if self.stage == "heads" else 0.01)

    @property
    def schedule_name(self) -> str:
        return self.schedule or ("constant" if self.stage == "heads" else "rsine")
