"""PEFT adapters (LoRA and the other PEFT methods) as checkpoints.

A ``transformers.Trainer`` run of a PEFT model writes ``checkpoint-<step>/`` folders holding the
adapter only: ``adapter_model.safetensors`` (or the older ``adapter_model.bin``) and
``adapter_config.json``; ``PeftModel.save_pretrained`` writes the same two files. The adapter's
tensors are the checkpoint; ``adapter_config.json`` is copied back verbatim, because
``PeftModel.from_pretrained`` cannot load an adapter without it. It is checked to be a JSON object
naming its ``peft_type`` when read and again before it is written back. No I/O beyond reading it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CmdError

# The adapter's weight file, by preference (PEFT reads the safetensors one first).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_STACK = "peft"  # Checkpoint.stack of an adapter folder; `cmd ls` calls it "huggingface peft adapter"


def adapter_weights(names: list[str] | set[str]) -> str | None:
    """The adapter weight file among a folder's file names, if any."""
    return next((name for name in ADAPTER_WEIGHTS if name in names), None)


def check_adapter_config(data: bytes, shown: Path) -> None:
    """Raise ``CmdError`` unless ``data`` is an ``adapter_config.json`` PEFT can read: UTF-8 JSON, an
    object with a string ``peft_type``. ``shown`` names the file in the message."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CmdError(f"{shown}: not readable JSON ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       f"PeftModel.from_pretrained needs it to load the adapter") from None
    except RecursionError:
        raise CmdError(f"{shown}: refused: JSON nested too deeply") from None
    if not isinstance(value, dict) or not isinstance(value.get("peft_type"), str):
        raise CmdError(f"{shown}: not a PEFT adapter config (expected a JSON object with a peft_type)")
