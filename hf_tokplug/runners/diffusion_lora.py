"""Diffusion tasks: ``diffusion_lora`` (DreamBooth-style LoRA on a Diffusers UNet) and ``diffusion_generate``.

Training runs on transformers' ``Trainer`` (accelerate underneath: devices, mixed precision, gradient accumulation,
checkpoints, resume, the host's loss terms and ``TokPlugCallback``) over one module, :class:`LatentDiffusionLoRA`,
that holds the frozen text encoder and VAE and the UNet with a PEFT LoRA adapter; only the LoRA weights are saved,
in the Diffusers LoRA format with the adapter config as metadata (so inference applies the training scale).

Data: a folder of instance images and a prompt (``task_options``); with ``class_data_dir`` + ``class_prompt``,
DreamBooth prior preservation adds class images with weight ``prior_loss_weight``. Latents are encoded once (VAE
posterior mean) before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import toy
from ..errors import RecipeError
from ..lifecycle import Run
from ..modeling import SD_ATTENTION_TARGETS, load_pipeline, save_unet_lora, unet_lora_state
from ..traits import TaskTraits
from ..task import Runner

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DiffusionOptions(BaseModel):
    """``task_options`` of diffusion_lora / diffusion_generate.

    Args:
        instance_data_dir: folder of the subject's images (``toy://shapes/red-square`` for the embedded default).
        instance_prompt: the training prompt, e.g. ``"a photo of sks dog"``.
        class_data_dir, class_prompt: prior-preservation images and prompt (both or neither).
        prior_loss_weight: weight of the prior-preservation loss.
        resolution: square training size in pixels.
        sample_prompts: prompts rendered into ``<output_dir>/samples/`` at the end (and every ``sample_every`` steps).
        sample_every: steps between sample renders (0: only at the end).
        num_inference_steps, guidance_scale: sampling settings.
        seed: sampling seed.
    """

    model_config = ConfigDict(extra="forbid")

    instance_data_dir: str | None = None
    instance_prompt: str | None = None
    class_data_dir: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = Field(1.0, ge=0.0)
    resolution: int = Field(512, ge=8)
    sample_prompts: list[str] = Field(default_factory=list)
    sample_every: int = Field(0, ge=0)
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    seed: int = 0


class LatentDiffusionLoRA(torch.nn.Module):
    """Text encoder + VAE (frozen) and the UNet (LoRA). ``forward`` returns the denoising loss.

    Attributes:
        library_name: ``diffusers`` (model card metadata).
    """

    library_name = "diffusers"

    def __init__(self, pipeline: Any, prior_loss_weight: float = 1.0):
        super().__init__()
        self.unet, self.text_encoder, self.vae = pipeline.unet, pipeline.text_encoder, pipeline.vae
        self.scheduler, self.tokenizer = pipeline.scheduler, pipeline.tokenizer
        self.prior_loss_weight = prior_loss_weight
        self.text_encoder.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.config = self.unet.config  # Trainer reads model.config

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, is_prior: torch.Tensor | None = None,
                **_: Any) -> dict[str, torch.Tensor]:
        noise = torch.randn_like(latents)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        with torch.no_grad():
            context = self.text_encoder(input_ids)[0]
        pred = self.unet(noisy, steps, encoder_hidden_states=context).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        per_example = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if is_prior is not None and bool(is_prior.any()):
            prior = is_prior.bool()
            loss = per_example[~prior].mean() + self.prior_loss_weight * per_example[prior].mean()
        else:
            loss = per_example.mean()
        return {"loss": loss, "prediction": pred}

    # The text encoder's token embeddings stand for the model's (tokens plugins add are resized and initialised
    # there, like a language model's).
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.text_encoder.get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        return self.text_encoder.resize_token_embeddings(*args, **kwargs)

    def lora_state(self, adapter: str = "default") -> dict[str, torch.Tensor]:
        return unet_lora_state(self.unet, adapter)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """The LoRA in the Diffusers format (``pytorch_lora_weights.safetensors``) with its config as metadata."""
        save_unet_lora(self.unet, folder)


def _images(folder: Path, resolution: int, key: str, source: str) -> list[torch.Tensor]:
    from PIL import Image

    if not folder.is_dir():
        raise RecipeError(f"image folder not found: {folder}", where=f"{source}: task_options.{key}",
                          fix="point at a folder of .png/.jpg images (toy://shapes/red-square for the embedded default)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RecipeError(f"no images in {folder}", where=f"{source}: task_options.{key}",
                          fix=f"add images with one of the suffixes {', '.join(IMAGE_SUFFIXES)}")
    out = []
    for path in files:
        img = Image.open(path).convert("RGB")
        side = min(img.size)  # centre crop, then resize
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        pixels = torch.tensor(list(img.getdata()), dtype=torch.float32).view(resolution, resolution, 3)
        out.append(pixels.permute(2, 0, 1) / 127.5 - 1.0)
    return out


class DiffusionLoRA(Runner):
    task = "diffusion_lora"
    description = "DreamBooth-style LoRA on a Diffusers UNet (SD1.5 layout), optional prior preservation; LoRA saved in Diffusers format."
    needs_data = False
    auto_class = "DiffusionPipeline"
    model_mapping = None
    options_class = DiffusionOptions
    traits = TaskTraits(model_kind="diffusion_unet", label_shift=None, batch_fields=("latents", "input_ids", "is_prior"),
                        adapter="required", generates="images")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pipe: Any = None  # the Diffusers pipeline: its tokenizer, text encoder, VAE and UNet are the run's parts

    def check_model(self, offline: bool) -> None:
        name = self.recipe.model.name_or_path
        if toy.is_toy(name):
            from ..toy.diffusion import PIPELINES

            if name[len(toy.SCHEME):] not in PIPELINES:
                raise RecipeError(f"task {self.task!r} needs a Diffusers pipeline; {name!r} is not one",
                                  where=f"{self.source}: model.name_or_path", fix="use toy://sd or a Stable Diffusion Hub id")
            return
        path = Path(name).expanduser()
        if path.exists() and not (path / "model_index.json").is_file():
            raise RecipeError(f"{name} is not a Diffusers pipeline folder (no model_index.json)",
                              where=f"{self.source}: model.name_or_path", fix="point at a folder saved by DiffusionPipeline")

    def check_data(self) -> None:
        o = self.options
        for key in ("instance_data_dir", "instance_prompt"):
            if not getattr(o, key):
                raise RecipeError(f"task {self.task!r} needs task_options.{key}",
                                  where=f"{self.source}: task_options.{key}",
                                  fix="e.g. instance_data_dir: toy://shapes/red-square, instance_prompt: a photo of sks square")
        if bool(o.class_data_dir) != bool(o.class_prompt):
            raise RecipeError("prior preservation needs both class_data_dir and class_prompt",
                              where=f"{self.source}: task_options", fix="set both, or neither")
        if not o.instance_data_dir.startswith("toy://") and not Path(o.instance_data_dir).expanduser().is_dir():
            raise RecipeError(f"image folder not found: {o.instance_data_dir}",
                              where=f"{self.source}: task_options.instance_data_dir", fix="check the path")

    def lora_config(self) -> Any:
        from peft import LoraConfig

        a = self.recipe.adapter
        r, alpha, dropout, targets = (8, 32, 0.0, SD_ATTENTION_TARGETS) if a is None else (a.r, a.alpha, a.dropout, a.target_modules)
        if targets in ("all-linear", None):
            targets = SD_ATTENTION_TARGETS
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          init_lora_weights="gaussian")

    # ------------------------------------------------------------------------------------------------ parts

    def load_tokenizer(self, ctx: Run) -> Any:
        spec = self.recipe.model
        dtype = getattr(torch, spec.dtype) if isinstance(spec.dtype, str) and spec.dtype != "auto" else None
        self.pipe = load_pipeline(spec.name_or_path, dtype=dtype, revision=spec.revision)
        return self.pipe.tokenizer

    def load_model(self, ctx: Run) -> Any:
        self.pipe.tokenizer = ctx.tokenizer
        module = LatentDiffusionLoRA(self.pipe, self.options.prior_loss_weight)
        module.unet.requires_grad_(False)
        return module

    def peft_config(self, ctx: Run) -> Any:
        return self.lora_config()  # the task always trains a LoRA (traits.adapter: required)

    def attach_adapter(self, ctx: Run, model: Any, peft_config: Any) -> Any:
        model.unet.add_adapter(peft_config)
        return model

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        from ..toy.diffusion import resolve_images

        o = self.options
        module = ctx.model
        sets = [(o.instance_data_dir, o.instance_prompt, False, "instance_data_dir")]
        if o.class_data_dir:
            sets.append((o.class_data_dir, o.class_prompt, True, "class_data_dir"))
        rows = []
        vae = module.vae
        for folder, prompt, prior, key in sets:
            ids = module.tokenizer(prompt, padding="max_length", max_length=module.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt")["input_ids"][0]
            for pixels in _images(resolve_images(folder), o.resolution, key, self.source):
                with torch.no_grad():
                    latents = vae.encode(pixels.unsqueeze(0).to(vae.device, vae.dtype)).latent_dist.mean
                rows.append({"latents": (latents[0] * vae.config.scaling_factor).float().cpu(), "input_ids": ids,
                             "is_prior": torch.tensor(prior), "prompt": prompt})
        return {"train": rows}

    def base_collator(self, ctx: Run) -> Any:
        return collate

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        from transformers import Trainer

        args = self.trainer_arguments(ctx, remove_unused_columns=False, label_names=[])
        if self.options.sample_every:
            callbacks = [*callbacks, _sample_callback(self, ctx)]
        return _LoRATrainer(Trainer)(model=ctx.model, args=args, train_dataset=train, data_collator=collator,
                                     callbacks=callbacks)

    def finish(self, ctx: Run, trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
        if self.options.sample_prompts and trainer.is_world_process_zero():
            self.render(ctx, Path(self.recipe.output_dir) / "samples" / "final")
        ctx.tokenizer = None  # the pipeline's own tokenizer is unchanged: the run folder holds the LoRA only
        return {}

    def pipeline(self, ctx: Run) -> Any:
        """The pipeline with the run's current parts (a plugin's ``tokplug_prepare_model`` may have replaced them)."""
        if ctx.model is not None:
            self.pipe.unet, self.pipe.text_encoder, self.pipe.vae = ctx.model.unet, ctx.model.text_encoder, ctx.model.vae
        if ctx.tokenizer is not None:
            self.pipe.tokenizer = ctx.tokenizer
        return self.pipe

    def render(self, ctx: Run, folder: Path) -> list[Path]:
        from ..inference import prepare_pipeline

        o = self.options
        pipe = prepare_pipeline(ctx, self.pipeline(ctx))
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, prompt in enumerate(o.sample_prompts):
            image = pipe(prompt, num_inference_steps=o.num_inference_steps, guidance_scale=o.guidance_scale,
                         height=o.resolution, width=o.resolution,
                         generator=torch.Generator().manual_seed(o.seed + i)).images[0]
            path = folder / f"{i:02d}.png"
            image.save(path)
            paths.append(path)
        return paths

    @classmethod
    def load_pretrained(cls, ctx: Run, folder: Path, manifest: dict[str, Any]) -> None:
        """The base pipeline with this run's LoRA loaded as adapter ``default`` (``ctx.pipeline``)."""
        pipe = load_pipeline(manifest["base_model"])
        pipe.load_lora_weights(str(folder), adapter_name="default")
        ctx.pipeline, ctx.model, ctx.tokenizer = pipe, pipe.unet, pipe.tokenizer


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"latents": torch.stack([r["latents"] for r in rows]), "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "is_prior": torch.stack([r["is_prior"] for r in rows])}


def _LoRATrainer(base: type) -> type:  # noqa: N802 (a class factory)
    """``base`` (a Trainer class) that saves and resumes only the LoRA weights."""

    class LoRATrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            return (out["loss"], out) if return_outputs else out["loss"]

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            folder = Path(output_dir or self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(folder)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            module = self.accelerator.unwrap_model(model or self.model)
            state = load_file(str(Path(resume_from_checkpoint) / "pytorch_lora_weights.safetensors"))
            unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
            result = set_peft_model_state_dict(module.unet, convert_unet_state_dict_to_peft(unet_state),
                                               adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not fit this LoRA: {unexpected[:3]}")

    return LoRATrainer


def _sample_callback(runner: DiffusionLoRA, ctx: Run) -> Any:
    """Renders ``sample_prompts`` every ``sample_every`` steps into ``samples/step-N`` (main process)."""
    from transformers import TrainerCallback

    class SampleCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            every, prompts = runner.options.sample_every, runner.options.sample_prompts
            if every and prompts and state.global_step % every == 0 and state.is_world_process_zero:
                unet = ctx.model.unet
                was = unet.training
                runner.render(ctx, Path(args.output_dir) / "samples" / f"step-{state.global_step}")
                unet.train(was)

    return SampleCallback()


class DiffusionGenerate(DiffusionLoRA):
    task = "diffusion_generate"
    description = "No training: load a Diffusers pipeline, let plugins prepare it (e.g. compose TARA adapters), render sample_prompts."
    traits = TaskTraits(model_kind="diffusion_unet", label_shift=None, batch_fields=(), trains=False, trainer=False,
                        dataset_hooks=False, builds_model=False, adapter="none", generates="images")

    def check_data(self) -> None:
        if not self.options.sample_prompts:
            raise RecipeError("task diffusion_generate needs task_options.sample_prompts",
                              where=f"{self.source}: task_options.sample_prompts", fix="list the prompts to render")

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        return {}  # nothing is trained

    def finish(self, ctx: Run, trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
        paths = self.render(ctx, Path(self.recipe.output_dir) / "samples")
        ctx.tokenizer = None  # nothing to save but the images, the manifest and the card
        return {"images": len(paths)}
