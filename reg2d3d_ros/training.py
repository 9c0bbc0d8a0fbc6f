"""What every training command shares: options, cached training frames, checkpoints, learning-rate
schedules, the distributed set-up and the epoch loop of the update operators.

The methods' training modules (:mod:`reg2d3d_ros.scr.train`, :mod:`reg2d3d_ros.ppcl.train`,
:mod:`reg2d3d_ros.ppcflow.train`, :mod:`reg2d3d_ros.similarity.train`) build on this module;
progress is shown with :mod:`reg2d3d_ros.progress`.

Checkpoints are ``torch.save`` of plain state dicts and JSON strings (read back with
``weights_only=True``), written atomically (:func:`save_atomically`), and belong to one training
set-up: the metadata ``meta`` they were written with (its ``config`` entry's epoch count aside:
more epochs continue a finished training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .volume import add_label_arguments

#: The vertebrae of the evaluation's test set: never trained on by default.
TEST_VERTEBRAE = ("T6", "T8", "T10", "T12")


# -- command line ---------------------------------------------------------------------------------
def training_parser(prog: str, description: str, out: str, cache: str, what: str, quality: dict, per_frame: tuple, size: int,
                    seed: int) -> argparse.ArgumentParser:
    """The arguments every training command shares (output, cache, quality, vertebrae, CT, size, seed).

    ``per_frame`` is ``(option, help)`` of the per-frame count (e.g. ``("--starts", "start poses per frame")``).
    """
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--out", type=Path, default=Path(out), help=f"output folder for {what}")
    ap.add_argument("--cache", type=Path, default=Path(cache), help="folder for the precomputed training data and checkpoints")
    ap.add_argument("--quality", choices=sorted(quality), default="quick")
    ap.add_argument("--vertebrae", default="T3,T4,T5,T7,T9,T11", help="training vertebrae (the last one validates)")
    ap.add_argument("--frames-per-view", type=int, default=None)
    ap.add_argument(per_frame[0], type=int, default=None, help=per_frame[1])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--size", type=int, default=size, help="frame size, pixels (detector 307 mm)")
    ap.add_argument("--ct", type=Path, help="CT (NIfTI); default: the example CT")
    ap.add_argument("--labels", type=Path, help="label map of --ct")
    ap.add_argument("--label-table", type=Path, help="label names of --labels, CSV with columns structure,id (default: TotalSegmentator's, built in)")
    add_label_arguments(ap)
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--physics", choices=("randomised", "nominal"), default="randomised",
                    help="image formation of the training frames: a domain-randomised draw per frame, or the simulator's one setting")
    return ap


def training_setup(args, quality: dict, epochs_scale: float = 1.0):
    """``(ct, vertebrae, frames per view, starts, epochs)`` of a training command's arguments.

    ``quality`` maps ``args.quality`` to ``(frames, starts, epochs)``; ``args.starts`` overrides
    the starts (per-frame count).

    Raises :class:`ConfigError` for fewer than two vertebrae (the last one validates) or a CT
    without labels; warns when a test vertebra of the evaluation is trained on.
    """
    from .example import load_example
    from .volume import load_ct

    frames, starts, epochs = quality[args.quality]
    frames = args.frames_per_view or frames
    starts = args.starts or starts
    epochs = args.epochs or max(1, int(epochs * epochs_scale))
    vertebrae = [v.strip() for v in args.vertebrae.split(",") if v.strip()]
    if len(vertebrae) < 2:
        raise ConfigError("--vertebrae needs at least two vertebrae (the last one validates)")
    for bad in TEST_VERTEBRAE:
        if bad in vertebrae and args.ct is None:
            print(f"warning: {bad} is a test vertebra of the evaluation; its results will not be held out", file=sys.stderr)
    if args.ct is not None:
        if args.labels is None:
            raise ConfigError("--ct needs --labels")
        ct = load_ct(args.ct, labels_path=args.labels, label_table=args.label_table, label_set=args.label_set,
                     resample_labels=args.resample_labels)
    else:
        ct = load_example()
    return ct, vertebrae, frames, starts, epochs


# -- training data --------------------------------------------------------------------------------
def save_atomically(obj, path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it (a reader never sees half a file)."""
    import torch

    tmp = Path(path).with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def cached_training_frames(ct, vertebrae, frames_per_view: int, n_starts: int, max_mtre: float, size: int, seed: int, cache: Path,
                           prefix: str, per_frame, what: str, progress: bool = True, make_registrator=None, physics: str = "nominal"):
    """Yield ``(vertebra, blob)`` for every training frame; ``blob = per_frame(registrator, cases)`` is computed once.

    A frame is one simulated case set of a vertebra (AP and lateral, jittered) with ``n_starts``
    starts; blobs (tensors, lists, dicts) are cached as ``cache/<prefix><vertebra>_f<k>_...pt``.
    ``physics`` is the frames' image formation (:class:`reg2d3d_ros.eval.cases.CaseSet`).
    The registrator is ``make_registrator(ct, vertebra)`` (default
    :meth:`reg2d3d_ros.ppc.PPCRegistrator.from_ct`).
    """
    import torch

    from .eval.cases import CaseSet, make_cases
    from .ppc import PPCRegistrator
    from .progress import bar, end_line
    from .sim import CArmSetup

    cache.mkdir(parents=True, exist_ok=True)
    setup = CArmSetup().at_size(size)
    jobs = [(v, f) for v in vertebrae for f in range(frames_per_view)]
    t0 = time.time()
    for j, (vert, f) in enumerate(jobs):
        tag = "" if physics == "nominal" else f"_{physics}"
        path = cache / f"{prefix}{vert}_f{f}_s{seed}_n{n_starts}_m{max_mtre:g}_px{size}{tag}.pt"
        if path.exists():
            blob = torch.load(path, map_location="cpu", weights_only=True)
        else:
            cs = CaseSet(f"train-{vert}-{f}", (vert,), seed=seed + 100 * f + 10 * vertebrae.index(vert), jitter_deg=10.0, jitter_mm=15.0,
                         physics=physics)
            cases = make_cases(ct, cs, n_starts, max_mtre_mm=max_mtre, setup=setup)
            blob = per_frame((make_registrator or PPCRegistrator.from_ct)(ct, vert), cases)
            save_atomically(blob, path)
        yield vert, blob
        if progress:
            bar(what, j + 1, len(jobs), time.time() - t0)
    if progress:
        end_line()


# -- checkpoints ----------------------------------------------------------------------------------
def same_setup(saved_meta: dict, meta: dict) -> bool:
    """Whether a checkpoint written with ``saved_meta`` belongs to the training set-up ``meta`` (epoch count aside)."""
    a, b = json.loads(json.dumps(saved_meta)), json.loads(json.dumps(meta))
    a["config"].pop("epochs", None)
    b["config"].pop("epochs", None)
    return a == b


def matching_checkpoint(checkpoint, meta: dict):
    """The checkpoint at ``checkpoint`` if it exists and was written for ``meta`` (:func:`same_setup`), else None
    (another set-up starts afresh)."""
    import torch

    if checkpoint is None or not Path(checkpoint).exists():
        return None
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return ck if same_setup(json.loads(ck["meta_json"]), meta) else None


def load_checkpoint(path: Path, meta: dict):
    """The checkpoint at ``path`` (None if there is none); one of another set-up or unreadable is a :class:`ConfigError`."""
    import torch

    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to train from the start") from None
    if not same_setup(json.loads(ck["meta_json"]), meta):
        raise ConfigError(f"checkpoint {path} belongs to another training set-up; delete it or use another output folder")
    return ck


def resume(checkpoint: Path, meta: dict, net, opt):
    """Load a checkpoint of :func:`save_checkpoint` into ``net``/``opt`` (:func:`load_checkpoint`); returns
    ``(history, start_epoch, resumed)``."""
    ck = load_checkpoint(Path(checkpoint), meta)
    if ck is None:
        return [], 0, False
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return json.loads(ck["history_json"]), int(ck["epoch"]) + 1, True


def save_checkpoint(checkpoint: Path, epoch: int, net, opt, meta: dict, history: list) -> None:
    """Write a checkpoint atomically (plain state dicts and JSON strings: ``weights_only`` loadable)."""
    save_atomically({"epoch": epoch, "model": net.state_dict(), "optimizer": opt.state_dict(), "meta_json": json.dumps(meta),
                     "history_json": json.dumps(history)}, checkpoint)


# -- schedules ------------------------------------------------------------------------------------
def set_lr(opt, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for grp in opt.param_groups:
        grp["lr"] = lr


def set_cosine_lr(opt, base_lr: float, epoch: int, epochs: int) -> None:
    """Cosine decay from ``base_lr`` to a tenth of it over the epochs."""
    set_lr(opt, base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))))


def constant_then_cosine_lr(lr: float, epochs: int, epoch: int) -> float:
    """Learning rate of an epoch: ``lr``, then a cosine decay to 5 % of it over the last third."""
    start = int(epochs * 2 / 3)
    if epoch < start:
        return lr
    frac = (epoch - start) / max(1, epochs - start)
    return float(lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac))))


def distributed():
    """``(rank, world_size)``; initialises the process group under torchrun (``WORLD_SIZE > 1``)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


# -- the epoch loop of the update operators -------------------------------------------------------
def fit(modules: dict, opt, train: list, *, epochs: int, lr: float, batch: int, seed: int, batch_loss, evaluate, key, describe,
        label: str, clip_norm: float, meta: dict, checkpoint: Path | None = None, progress: bool = True):
    """Train networks on precomputed samples, resumably; the networks end with the best validation epoch's weights.

    Each epoch: the learning rate of :func:`set_cosine_lr`, the training samples shuffled into
    batches of ``batch``, per batch ``loss = batch_loss(samples, rng)`` (a scalar tensor), a step
    with the gradient norm clipped at ``clip_norm``; then ``evaluate()`` (a dict of validation
    numbers) and the epoch's history row ``{"epoch", "train_loss", **evaluate()}``. The epoch with
    the lowest ``key(row)`` is the best. With a ``checkpoint`` path, a checkpoint
    (``{name: state dict}`` of ``modules``, ``optimizer``, ``meta_json``, ``history_json``,
    ``best``) is written after every epoch and a matching one (:func:`matching_checkpoint`) is
    resumed from.

    Parameters
    ----------
    modules : dict
        ``{name: torch.nn.Module or None}`` (None: absent, saved as an empty state dict).
    describe : callable
        ``row -> str``: the progress bar's text after an epoch.

    Returns
    -------
    tuple
        ``(history, best epoch)`` (None when no epoch ran).
    """
    import torch

    from .progress import bar, end_line

    present = {k: m for k, m in modules.items() if m is not None}
    params = [p for m in present.values() for p in m.parameters()]
    history, start, best = [], 0, None
    ck = matching_checkpoint(checkpoint, meta)
    if ck is not None:
        for k, m in present.items():
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["optimizer"])
        history, best = json.loads(ck["history_json"]), ck["best"]
        start = len(history)
    rng = np.random.default_rng(seed + start)
    t0 = time.time()
    for epoch in range(start, epochs):
        set_cosine_lr(opt, lr, epoch, epochs)
        for m in present.values():
            m.train()
        order = rng.permutation(len(train))
        losses = []
        for i in range(0, len(order), batch):
            loss = batch_loss([train[j] for j in order[i : i + batch]], rng)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            opt.step()
            losses.append(float(loss.detach()))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), **evaluate()}
        history.append(row)
        if best is None or key(row) < best["key"]:
            best = {"key": key(row), "epoch": epoch} | {k: ({} if m is None else {n: v.clone() for n, v in m.state_dict().items()})
                                                        for k, m in modules.items()}
        if checkpoint is not None:
            save_atomically({k: ({} if m is None else m.state_dict()) for k, m in modules.items()}
                            | {"optimizer": opt.state_dict(), "meta_json": json.dumps(meta), "history_json": json.dumps(history), "best": best},
                            checkpoint)
        if progress:
            bar(label, epoch + 1, epochs, time.time() - t0, describe(row))
    if progress:
        end_line()
    if best is not None:
        for k, m in present.items():
            m.load_state_dict(best[k])
    return history, None if best is None else best["epoch"]
