"""The README's table of training options, made from the settings schema (TrainSettings): each
option's flag, what it does, its default (per method where the methods differ), the methods
that use it, and what kohya sd-scripts, diffusers' example script, AUTOMATIC1111 and OneTrainer
call the same thing. tests/test_options_table.py checks that the README holds this table.

Usage: python scripts/options_table.py   (rewrites the table in README.md between its markers)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START = "<!-- options table: made by scripts/options_table.py from tinv_gui/settings.py -->"
END = "<!-- end of the options table -->"

# What the anchors call each option (kohya: sd-scripts' train_textual_inversion.py flags;
# diffusers: examples/textual_inversion; A1111: its Train tab; OneTrainer: its UI).
# An option none of them has is left out.
ANCHOR_NAMES = {
    "images": "kohya, diffusers `--train_data_dir`; A1111 *Dataset directory*; OneTrainer concept *Path*",
    "token": "kohya `--token_string`; diffusers `--placeholder_token`; A1111 *Name*; OneTrainer *Placeholder*",
    "output_dir": "kohya, diffusers `--output_dir`",
    "model": "kohya, diffusers `--pretrained_model_name_or_path`; OneTrainer *Base Model*",
    "init": "kohya `--init_word`; diffusers `--initializer_token`; A1111 *Initialization text*; OneTrainer *Initial embedding text*",
    "steps": "kohya, diffusers `--max_train_steps`; A1111 *Max steps*; OneTrainer *Epochs*",
    "batch_size": "kohya, diffusers `--train_batch_size`; A1111 *Batch size*; OneTrainer *Batch Size*",
    "lr": "kohya, diffusers `--learning_rate`; A1111 *Embedding Learning rate*; OneTrainer *Learning Rate*",
    "weight_decay": "diffusers `--adam_weight_decay`; kohya `--optimizer_args weight_decay=`; OneTrainer *Weight Decay*",
    "lr_schedule": "kohya, diffusers `--lr_scheduler`; OneTrainer *Learning Rate Scheduler*",
    "warmup_steps": "kohya, diffusers `--lr_warmup_steps`; OneTrainer *Learning Rate Warmup Steps*",
    "grad_clip": "kohya `--max_grad_norm`; A1111 *Gradient Clipping*; OneTrainer *Clip Grad Norm*",
    "grad_accum": "kohya, diffusers `--gradient_accumulation_steps`; A1111 *Gradient accumulation steps*; OneTrainer *Accumulation Steps*",
    "vectors": "kohya `--num_vectors_per_token`; diffusers `--num_vectors`; A1111 *Number of vectors per token*; OneTrainer *Token count*",
    "seed": "kohya, diffusers `--seed`",
    "style": "diffusers `--learnable_property`; kohya `--use_object_template` / `--use_style_template`; A1111 prompt template file",
    "use_captions": "kohya `--caption_extension`; A1111 `[filewords]` in the template; OneTrainer concept *Prompt Source*",
    "save_every": "kohya `--save_every_n_steps`; diffusers `--save_steps`; A1111 *Save an embedding to log directory every N steps*; OneTrainer *Save Every*",
    "resolution": "kohya, diffusers `--resolution`; A1111 *Width* / *Height*; OneTrainer *Resolution*",
    "flip": "kohya `--flip_aug`; OneTrainer *Random Flip*",
    "aspect_buckets": "kohya `--enable_bucket`; OneTrainer *Aspect Ratio Bucketing*",
    "repeats": "kohya `N_name` folders (`num_repeats`); OneTrainer concept *Repeats*",
    "unmasked_weight": "kohya `--alpha_mask` / `--masked_loss`; A1111 *Use PNG alpha channel as loss weight*; OneTrainer *Masked Training*, *Unmasked Weight*",
    "min_snr_gamma": "kohya `--min_snr_gamma`; invoke-training `min_snr_gamma`; OneTrainer *Min SNR Gamma*",
    "noise_offset": "kohya `--noise_offset`; OneTrainer *Offset Noise Weight*",
    "ema_decay": "OneTrainer *EMA*, *EMA Decay*",
    "log_with": "kohya `--log_with`; diffusers `--report_to`; OneTrainer *Tensorboard*",
    "gradient_checkpointing": "kohya, diffusers `--gradient_checkpointing`; OneTrainer *Gradient checkpointing*",
    "preview_every": "kohya `--sample_every_n_steps`; diffusers `--validation_steps`; A1111 *Save an image to log directory every N steps*; OneTrainer *Sample After*",
    "preview_prompts": "kohya `--sample_prompts`; diffusers `--validation_prompt`; A1111 preview prompt (txt2img); OneTrainer samples",
    "preview_steps": "kohya sample prompt `--s`; A1111 txt2img *Sampling steps*",
    "scale_lr": "kohya, diffusers `--scale_lr`",
    "resume": "kohya `--weights`; diffusers `--resume_from_checkpoint`; A1111 continues the embedding's own training",
    "precision": "kohya, diffusers `--mixed_precision`; OneTrainer *Train Data Type*",
    "fp8_weights": "kohya `--fp8_base`; OneTrainer's per-part data type `float8 (W8)`; ComfyUI's fp8 and scaled fp8 weights",
}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def default_text(field: dataclasses.Field) -> str:
    """The default as the table says it: each method's where they publish one, else the field's."""
    from tinv_gui.methods import METHODS

    per_method = {m.name: m.defaults[field.name] for m in METHODS.values() if field.name in m.defaults}
    if per_method:
        values = set(map(str, per_method.values()))
        if len(values) == 1:
            return f"`{values.pop()}`"
        return ", ".join(f"`{value}` ({method})" for method, value in per_method.items())
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return "—" if default in (None, "", []) else f"`{default}`"


def options_table() -> str:
    """The Markdown table of every TrainSettings option."""
    from tinv_gui.methods import METHODS
    from tinv_gui.schema import described_fields, flag_of
    from tinv_gui.settings import TrainSettings

    lines = ["| option | what it does | default | methods | the anchors' names |", "| --- | --- | --- | --- | --- |"]
    for field, spec, kind in described_fields(TrainSettings):
        flag = flag_of(field.name, spec)
        choices = f" One of {', '.join(f'`{c}`' for c in kind.choices)}." if kind.choices else ""
        bounds = f" ({spec.bounds})" if spec.bounds else ""
        methods = ", ".join(spec.methods) if spec.methods and len(spec.methods) < len(METHODS) else "all"
        help_text = spec.help.replace("<", "&lt;").replace(">", "&gt;")  # '<my-cat>' is no HTML tag
        what = f"**{spec.label}**{bounds}: {help_text.rstrip('.')}.{choices}"
        lines.append(f"| `{flag}` | {_cell(what)} | {default_text(field)} | {methods} | {_cell(ANCHOR_NAMES.get(field.name, '—'))} |")
    return "\n".join(lines)


def readme_with_table(readme: str) -> str:
    """The README with the table between its markers replaced by the current one."""
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{options_table()}\n{END}{after}"


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(readme_with_table(path.read_text()))
    print(f"options table written into {path}")
