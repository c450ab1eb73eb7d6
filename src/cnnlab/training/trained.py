"""A trained model from its checkpoint, with torch alone: the file read weights-only, the network
and head rebuilt from the architecture it records, and the data config it was trained with.
`Classifier.restore` (training, evaluation) wraps these in the LightningModule; `cnnlab predict`
uses them as they are, so that classifying a few images does not wait for Lightning's import."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from cnnlab.core.config import DataSpec, parse
from cnnlab.core.errors import CnnlabError, one_line
from cnnlab.training.heads import Head, build_head
from cnnlab.training.network import ModelSpec, build_network


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint's contents, loaded weights-only (nothing in the file is unpickled into code);
    a file that is not a whole checkpoint is one line naming it and what is wrong."""
    not_one = CnnlabError(f"{path}: not a PyTorch checkpoint (unreadable as one)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        # torch.save writes a zip archive (a pickle, protocol 2+, before torch 1.6): other bytes would
        # reach the unpickler, whose error then depends on which bytes they are.
        if head and not head.startswith((b"PK\x03\x04", b"\x80")):
            raise not_one
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # torch's weights-only unpickler met a class or function
            raise CnnlabError(f"{path}: refused: it holds Python objects, not only tensors and plain values "
                              f"(loading it could run code); cnnlab writes no such checkpoints") from None
        raise not_one from None
    # the unpickler on bytes that are no pickle: a stack or memo op with nothing there, text that is none
    except (IndexError, KeyError, UnicodeDecodeError):
        raise not_one from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:
        raise CnnlabError(f"{path}: not a complete checkpoint, empty or cut short ({one_line(exc)[:120]})") from None
    except OSError as exc:
        raise CnnlabError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(state, dict):
        raise CnnlabError(f"{path}: not a checkpoint (it holds a {type(state).__name__})")
    return state


def rebuild(checkpoint: str | Path, map_location="cpu") -> tuple[nn.Module, Head, dict, dict]:
    """The untrained network and head of the architecture a checkpoint records, that architecture,
    and the checkpoint's weights (the LightningModule's state dict: `net.*` and `head.*`)."""
    state = read_checkpoint(checkpoint, map_location)
    arch = (state.get("hyper_parameters") or {}).get("architecture")
    if not arch or "state_dict" not in state:
        raise CnnlabError(f"{checkpoint}: not a cnnlab checkpoint (no recorded architecture and weights; "
                          f"a bare state dict or another program's file?)")
    try:
        spec = parse(ModelSpec, arch["model"], "model")
        head = build_head(spec, arch["num_labels"])
        net = build_network(spec, arch["input_shape"][0], arch["input_shape"][1], head.num_outputs)
    except (CnnlabError, KeyError, TypeError, IndexError) as exc:
        raise CnnlabError(f"{checkpoint}: the architecture it records cannot be built ({exc})") from None
    return net, head, arch, state["state_dict"]


def load_weights(module: nn.Module, weights: dict, checkpoint: str | Path) -> None:
    """`weights` into `module`, every key matched, or one line saying the file does not fit."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError) as exc:  # missing or unexpected keys, size mismatches
        detail = " ".join(str(exc).split())[:200]
        raise CnnlabError(f"{checkpoint}: its weights do not match the architecture it records ({detail})") from None


def recorded_data(checkpoint: str | Path) -> dict:
    """The data module's hyperparameters a checkpoint records (its data config and folder)."""
    hparams = read_checkpoint(checkpoint).get("datamodule_hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("data"), dict) or "name" not in hparams["data"]:
        raise CnnlabError(f"{checkpoint}: records no dataset (not written by `cnnlab train`?)")
    return hparams


def recorded_data_spec(checkpoint: str | Path) -> DataSpec:
    """The data config a checkpoint was trained with (class names, image size, normalisation)."""
    try:
        return parse(DataSpec, recorded_data(checkpoint)["data"], "data")
    except CnnlabError as exc:
        raise CnnlabError(f"{checkpoint}: its recorded data config cannot be used ({exc})") from None
