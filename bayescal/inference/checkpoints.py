"""Checkpoints of a MAP/Laplace/SVI run: its state, written atomically, read safely.

A checkpoint holds plain data only (tensors, numbers, strings, lists and dicts of them) and
is read with ``torch.load(weights_only=True)``, which refuses anything else: a checkpoint
file can never run code. It carries the fingerprint of the run that wrote it, and a run
resumes only from a checkpoint with its own fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch

from bayescal.errors import BadInput
from bayescal.output import write_atomically


@dataclass
class FitState:
    """Everything needed to continue a MAP/Laplace/SVI run: the stage, steps taken, losses,
    the MAP point and the Laplace covariance."""

    stage: str = "map"
    step: int = 0
    losses: dict = field(default_factory=lambda: {"map": [], "guide": []})
    skipped: int = 0
    retries: int = 0
    u_map: torch.Tensor | None = None
    covariance: torch.Tensor | None = None

    @property
    def total(self) -> int:
        """Iterations so far: MAP (Newton) iterations + SVI steps."""
        return len(self.losses["map"]) + self.step



#: Layout version of the checkpoint file.
CHECKPOINT_FORMAT = 1
#: What the fingerprint's fields are called in messages.
FINGERPRINT_NAMES = {"card": "the model card", "data": "the data", "method": "--method",
                     "guide": "--guide", "seed": "--seed", "centered": "--centered",
                     "versions": "the package versions"}


def corrupt_checkpoint(path: Path, detail: str) -> BadInput:
    return BadInput(f"{path}: not a usable bayescal checkpoint ({' '.join(detail.split())}); "
                    "remove it, or fit without --resume")


def _state_to_dict(state: FitState) -> dict:
    return {"stage": state.stage, "step": state.step,
            "losses_map": [float(x) for x in state.losses["map"]],
            "losses_guide": [float(x) for x in state.losses["guide"]],
            "skipped": state.skipped, "retries": state.retries,
            "u_map": None if state.u_map is None else state.u_map.detach().clone(),
            "covariance": None if state.covariance is None else state.covariance.detach()}


def state_from_dict(data: dict) -> FitState:
    return FitState(stage=data["stage"], step=data["step"],
                    losses={"map": list(data["losses_map"]), "guide": list(data["losses_guide"])},
                    skipped=data["skipped"], retries=data["retries"], u_map=data["u_map"],
                    covariance=data["covariance"])


def rng_state() -> dict:
    """Pyro's random states (torch, Python, numpy) as plain data."""
    state = pyro.util.get_rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {"torch": state["torch"], "random": state["random"],
            "numpy": [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}


def set_rng_state(state: dict) -> None:
    name, keys, pos, has_gauss, cached = state["numpy"]
    pyro.util.set_rng_state({"torch": state["torch"], "random": state["random"],
                             "numpy": (name, keys.numpy().astype("uint32"), pos, has_gauss,
                                       cached)})


def _load(path: Path, expected: dict[str, type | tuple[type, ...]]) -> dict:
    """A checkpoint file's contents, loaded safely (plain data only) and checked to have the
    ``expected`` top-level keys and types and this bayescal's format."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling raises many types for a truncated or foreign file
        raise corrupt_checkpoint(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(saved, dict) or set(saved) != set(expected):
        raise corrupt_checkpoint(path, "unexpected contents")
    for key, kind in expected.items():
        if not isinstance(saved[key], kind):
            raise corrupt_checkpoint(path, f"{key} has the wrong type")
    if saved["format"] != CHECKPOINT_FORMAT:
        raise corrupt_checkpoint(path, f"format {saved['format']}, this bayescal reads "
                                       f"{CHECKPOINT_FORMAT}")
    return saved


def check_fingerprint(path: Path, theirs: dict, fingerprint: dict[str, str]) -> None:
    """A :class:`BadInput` naming what differs unless the checkpoint at ``path`` (stamped
    ``theirs``) belongs to the run identified by ``fingerprint``."""
    differs = [key for key in sorted(set(fingerprint) | set(theirs))
               if str(theirs.get(key)) != str(fingerprint.get(key))]
    if differs:
        def shown(key):
            name = FINGERPRINT_NAMES.get(key, key)
            if key in ("card", "data"):
                return f"{name} differs"
            return f"{name} {theirs.get(key, '?')} there, {fingerprint.get(key, '?')} now"

        raise BadInput(f"--resume: {path} belongs to another run ({'; '.join(map(shown, differs))}"
                       "): rerun with that run's inputs, or without --resume to start afresh")


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, loaded safely and checked for layout."""
    saved = _load(path, {"format": int, "fingerprint": dict, "state": dict,
                         "guide": (dict, type(None)), "optim": (dict, type(None)), "rng": dict})
    state = saved["state"]
    fields = {"stage": str, "step": int, "losses_map": list, "losses_guide": list,
              "skipped": int, "retries": int, "u_map": (torch.Tensor, type(None)),
              "covariance": (torch.Tensor, type(None))}
    if set(state) != set(fields) or not all(isinstance(state[k], t) for k, t in fields.items()) \
            or state["stage"] not in ("map", "guide") or state["step"] < 0:
        raise corrupt_checkpoint(path, "state has the wrong layout")
    return saved


def describe_checkpoint(path: Path) -> str:
    """A few words on what a checkpoint file holds (for messages)."""
    try:
        state = _read_checkpoint(path)["state"]
    except BadInput:
        return "an unreadable checkpoint"
    iterations = len(state["losses_map"]) + state["step"]
    return f"the checkpoint of an earlier run ({state['stage']} stage, iteration {iterations})"


def load_checkpoint(path: Path, fingerprint: dict[str, str], dim: int) -> dict:
    """A checkpoint to resume from: readable, of this run (same fingerprint) and of its
    model's dimension; each problem a :class:`BadInput` naming the file."""
    saved = _read_checkpoint(path)
    check_fingerprint(path, saved["fingerprint"], fingerprint)
    state = saved["state"]
    for name, shape in (("u_map", (dim,)), ("covariance", (dim, dim))):
        value = state[name]
        if value is not None and (tuple(value.shape) != shape or not torch.isfinite(value).all()):
            raise corrupt_checkpoint(path, f"{name} does not fit this model")
    if state["stage"] == "guide" and (state["u_map"] is None or state["covariance"] is None):
        raise corrupt_checkpoint(path, "the guide stage has no MAP point")
    return saved


class Checkpointer:
    """Writes the run's state atomically (:func:`bayescal.output.write_atomically`), as plain
    data stamped with the run's fingerprint."""

    def __init__(self, path: Path, fingerprint: dict[str, str]) -> None:
        self.path = path
        self.fingerprint = {str(k): str(v) for k, v in fingerprint.items()}

    def __call__(self, state: FitState, guide, optim) -> None:
        payload = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint,
                   "state": _state_to_dict(state),
                   "guide": None if guide is None else dict(guide.state_dict()),
                   "optim": None if optim is None else optim.get_state(),
                   "rng": rng_state()}
        write_atomically(self.path, lambda f: torch.save(payload, f))

# ------------------------------------------------------------------------------ NUTS
#
# A NUTS run keeps one file for where its chains start (the approximation, written once) and
# one per chain, written at the end of warm-up and every few sampling draws: the chain's
# position, its adapted step size and mass matrix, its draws and statistics so far and its
# random state. Sampling after warm-up is a Markov chain with fixed settings, so a chain
# resumed from its file goes on as it would have.


def nuts_start_path(folder: Path) -> Path:
    return Path(folder) / "nuts-start.pt"


def nuts_chain_path(folder: Path, chain: int) -> Path:
    return Path(folder) / f"nuts-chain{chain}.pt"


def write_plain(path: Path, fingerprint: dict[str, str], state: dict) -> None:
    """Write ``state`` (plain data) stamped with ``fingerprint``, atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "fingerprint": {str(k): str(v)
                                                            for k, v in fingerprint.items()},
               "state": state}
    write_atomically(path, lambda f: torch.save(payload, f))


def read_plain(path: Path, fingerprint: dict[str, str], fields: dict[str, type | tuple]) -> dict:
    """The state of a file written by :func:`write_plain`, of this run (same fingerprint) and
    with ``fields`` of the given types; each problem a :class:`BadInput` naming the file."""
    saved = _load(path, {"format": int, "fingerprint": dict, "state": dict})
    check_fingerprint(path, saved["fingerprint"], fingerprint)
    state = saved["state"]
    if set(state) != set(fields) or not all(isinstance(state[k], t) for k, t in fields.items()):
        raise corrupt_checkpoint(path, "state has the wrong layout")
    return state


#: What a NUTS start file holds.
NUTS_START_FIELDS = {"centre": torch.Tensor, "root": torch.Tensor, "substeps": torch.Tensor,
                     "centered": list, "steps": int, "sd_ratios": dict, "init_time": float}
#: What a NUTS chain file holds.
NUTS_CHAIN_FIELDS = {"w": torch.Tensor, "step_size": float, "inverse_mass": torch.Tensor,
                     "draws": torch.Tensor, "stats": dict, "warmup_failures": int,
                     "retries": int, "rng": dict}
