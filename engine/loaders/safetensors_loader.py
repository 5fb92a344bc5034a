"""Hugging Face checkpoint directories: config.json, single or sharded safetensors, tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.errors import CorruptCheckpointError, ModelNotFoundError
from engine.model_config import ModelConfig


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: unreadable JSON ({exc})") from exc


class HFCheckpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(
                f"{self.path} has no config.json; point --model at a Hugging Face checkpoint"
            )
        config = ModelConfig.from_hf(_read_json(config_path), name=self.path.name)
        self.config = config.replace(eos_token_ids=self._generation_eos(config.eos_token_ids))
        self.files = self._weight_files()

    def _generation_eos(self, eos_ids: tuple[int, ...]) -> tuple[int, ...]:
        """config.json's eos ids plus generation_config.json's (Llama 3 Instruct ends turns with
        <|eot_id|>, which only the latter lists)."""
        path = self.path / "generation_config.json"
        if not path.is_file():
            return eos_ids
        extra = _read_json(path).get("eos_token_id")
        extra = extra if isinstance(extra, list) else ([] if extra is None else [extra])
        return tuple(dict.fromkeys([*eos_ids, *(int(e) for e in extra)]))

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptCheckpointError(f"{index} has no weight_map")
            files = [self.path / f for f in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CorruptCheckpointError(f"{index} names shards that are missing: {absent}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(
                f"{self.path} has no *.safetensors weights (PyTorch .bin checkpoints are not supported; "
                "convert them with transformers' save_pretrained(safe_serialization=True))"
            )
        return files

    def tokenizer(self):
        from engine.tokenizer import Tokenizer

        if not (self.path / "tokenizer.json").is_file():
            return None
        return Tokenizer.from_pretrained_dir(self.path)

    @property
    def num_tensors(self) -> int:
        from safetensors import safe_open

        total = 0
        for f in self.files:
            with self._open(safe_open, f) as handle:
                total += len(handle.keys())
        return total

    @staticmethod
    def _open(safe_open, path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # SafetensorError, OSError
            raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for f in self.files:
            with self._open(safe_open, f) as handle:
                for name in handle.keys():
                    try:
                        yield name, handle.get_tensor(name)
                    except Exception as exc:
                        raise CorruptCheckpointError(f"{f}: tensor {name} is unreadable ({exc})") from exc
