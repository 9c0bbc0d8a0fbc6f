"""Training of the SCR U-Net and of the pose-regression baseline, resumable.

Both trainers take the cached views of :mod:`reg2d3d_ros.scr.data`, degrade them on the fly,
and write a checkpoint after every epoch (:func:`reg2d3d_ros.training.save_checkpoint`: plain state
dicts, read back with ``weights_only=True``); started again with the same checkpoint path they resume where they
stopped. Under ``torchrun`` (``WORLD_SIZE > 1``) they use PyTorch's DistributedDataParallel with
a DistributedSampler; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import bar, end_line
from ..training import constant_then_cosine_lr, distributed, resume, save_checkpoint, set_lr
from .data import SCRDataset, SceneNormalisation
from .loss import scr_loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (Adam, constant learning rate as in the seed, then a short decay)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    widths: tuple = (24, 48, 64, 96)
    stride: int = 2
    validation_fraction: float = 0.05
    l1_weight: float = 1.0
    time_budget_s: float = 0.0


def out_of_time(cfg: TrainConfig, started: float, epoch_seconds: float) -> bool:
    """Whether another epoch of ``epoch_seconds`` would end past the budget (0: no budget).

    The first epoch of a run (``epoch_seconds`` 0) always runs, so every run makes progress.
    """
    return cfg.time_budget_s > 0 and epoch_seconds > 0 and time.time() - started + epoch_seconds > cfg.time_budget_s


def train_scr(views: dict, norm: SceneNormalisation, cfg: TrainConfig, checkpoint: Path, device: str = "cpu", progress: bool = True,
              init_from: Path | None = None, intrinsics=None):
    """Train the SCR U-Net on cached views (resuming from ``checkpoint``).

    ``init_from`` (an SCR model file or checkpoint of the same network) warm-starts the weights
    of a new training (ignored when resuming). ``intrinsics`` (the views' camera) is needed for
    views with randomised physics. With ``cfg.time_budget_s`` the run stops after the last
    epoch that fits the budget (the checkpoint holds it; the next run resumes there).

    Returns
    -------
    (UNet, list of dict)
        The trained network (eval mode) and the per-epoch history (train/validation loss and
        mean scene-coordinate error in mm over hit pixels); ``len(history) < cfg.epochs`` when
        the time budget stopped it.
    """
    from ..nets import UNet

    rank, world = distributed()
    torch.manual_seed(cfg.seed)
    n = len(views["poses"])
    n_val = max(1, int(round(n * cfg.validation_fraction)))
    idx = np.arange(n)
    train_idx, val_idx = idx[: n - n_val], idx[n - n_val :]
    ds = SCRDataset(views, norm, augment=True, seed=cfg.seed, intrinsics=intrinsics)
    ds_val = SCRDataset(views, norm, augment=True, seed=cfg.seed + 1, intrinsics=intrinsics)
    net = UNet(1, 8, widths=cfg.widths, stride=cfg.stride).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    meta = {"kind": "scr", "config": json.loads(json.dumps({**asdict(cfg), "time_budget_s": 0.0})), "n_views": n, "norm": [list(norm.center_ct_mm), norm.scale_mm]}
    history, start_epoch, resumed = resume(checkpoint, meta, net, opt)
    if resumed:
        if progress and rank == 0:
            print(f"resuming SCR training at epoch {start_epoch + 1}/{cfg.epochs} from {checkpoint}", file=sys.stderr)
    elif init_from is not None:
        try:
            blob = torch.load(init_from, map_location="cpu", weights_only=True)
            net.load_state_dict(blob["model"] if "model" in blob else blob["state_dict"])
        except Exception as exc:
            raise ConfigError(f"cannot warm-start from {init_from}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        if progress and rank == 0:
            print(f"warm start from {init_from}", file=sys.stderr)
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    off = cfg.stride // 2
    t0 = time.time()
    epoch_seconds = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        if out_of_time(cfg, t0, epoch_seconds):
            if progress and rank == 0:
                print(f"SCR training: time budget of {cfg.time_budget_s:.0f} s reached after epoch {epoch}/{cfg.epochs}; "
                      f"run again to resume", file=sys.stderr)
            break
        t_start = time.time()
        set_lr(opt, constant_then_cosine_lr(cfg.lr, cfg.epochs, epoch))
        ds.epoch = epoch
        sub = torch.utils.data.Subset(ds, train_idx.tolist())
        sampler = torch.utils.data.distributed.DistributedSampler(sub, seed=cfg.seed) if world > 1 else None
        if sampler is not None:
            sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(sub, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen, drop_last=True)
        model.train()
        tot, cnt, t_epoch = 0.0, 0, time.time()
        for b, item in enumerate(loader):
            x = item["image"].to(device)
            y = item["coords"][:, :, off :: cfg.stride, off :: cfg.stride].to(device)
            m = item["hit"][:, :, off :: cfg.stride, off :: cfg.stride].to(device)
            out = scr_loss(model(x), y, m, l1_weight=cfg.l1_weight)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            tot += float(out["loss"].detach())
            cnt += 1
            if progress and rank == 0:
                bar(f"SCR epoch {epoch + 1}/{cfg.epochs}", b + 1, len(loader), time.time() - t_epoch)
        val = evaluate_scr_loss(net, ds_val, val_idx, cfg, device)
        history.append({"epoch": epoch + 1, "train_loss": tot / max(1, cnt), **val, "seconds": round(time.time() - t0, 1)})
        if progress and rank == 0:
            end_line()
            print(f"epoch {epoch + 1}: train loss {tot / max(1, cnt):.3f}, validation loss {val['val_loss']:.3f}, "
                  f"scene-coordinate error {val['val_err_mm']:.2f} mm", file=sys.stderr)
        if rank == 0:
            save_checkpoint(checkpoint, epoch, net, opt, meta, history)
        epoch_seconds = time.time() - t_start
    net.eval()
    return net, history


def evaluate_scr_loss(net, ds: SCRDataset, idx, cfg: TrainConfig, device: str = "cpu") -> dict:
    """Validation loss and mean scene-coordinate error (mm) over hit pixels."""
    net.eval()
    off = cfg.stride // 2
    tot, err, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in idx:
            item = ds[int(i)]
            x = item["image"][None].to(device)
            y = item["coords"][None, :, off :: cfg.stride, off :: cfg.stride].to(device)
            m = item["hit"][None, :, off :: cfg.stride, off :: cfg.stride].to(device)
            out = scr_loss(net(x), y, m)
            tot += float(out["loss"].detach())
            err += float(out["err"]) * ds.norm.scale_mm
            n += 1
    net.train()
    return {"val_loss": tot / max(1, n), "val_err_mm": err / max(1, n)}


def train_pose_regression(views: dict, norm: SceneNormalisation, target_pts_ct_mm: np.ndarray, cfg: TrainConfig, checkpoint: Path,
                          device: str = "cpu", progress: bool = True, intrinsics=None):
    """Train the PoseNet-style baseline with a geometric loss (mean 3-D distance of target points, mm).

    Returns
    -------
    (PoseRegressionNet, list of dict)
    """
    from ..nets import PoseRegressionNet

    torch.manual_seed(cfg.seed)
    n = len(views["poses"])
    ds = SCRDataset(views, norm, augment=True, seed=cfg.seed + 7, intrinsics=intrinsics)
    depth = float(np.median(np.linalg.norm(views["poses"][:, :3, 3], axis=1)))
    net = PoseRegressionNet(widths=cfg.widths, center_ct_mm=tuple(norm.center_ct_mm), depth_mm=depth, scale_mm=norm.scale_mm).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    pts = torch.as_tensor(target_pts_ct_mm, dtype=torch.float32, device=device)
    meta = {"kind": "posenet", "config": json.loads(json.dumps(asdict(cfg))), "n_views": n, "norm": [list(norm.center_ct_mm), norm.scale_mm]}
    history, start_epoch, _ = resume(checkpoint, meta, net, opt)
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        set_lr(opt, constant_then_cosine_lr(cfg.lr, cfg.epochs, epoch))
        ds.epoch = epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=True)
        net.train()
        tot, cnt, t_epoch = 0.0, 0, time.time()
        for b, item in enumerate(loader):
            T_gt = item["pose"].to(device=device, dtype=torch.float32)
            T = net(item["image"].to(device))
            p_gt = pts @ T_gt[:, :3, :3].transpose(1, 2) + T_gt[:, None, :3, 3]
            p = pts @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
            loss = (p - p_gt).norm(dim=-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            cnt += 1
            if progress:
                bar(f"pose regression epoch {epoch + 1}/{cfg.epochs}", b + 1, len(loader), time.time() - t_epoch)
        history.append({"epoch": epoch + 1, "train_mtre_mm": tot / max(1, cnt), "seconds": round(time.time() - t0, 1)})
        if progress:
            end_line()
            print(f"epoch {epoch + 1}: train mTRE {tot / max(1, cnt):.1f} mm", file=sys.stderr)
        save_checkpoint(checkpoint, epoch, net, opt, meta, history)
    net.eval()
    return net, history
