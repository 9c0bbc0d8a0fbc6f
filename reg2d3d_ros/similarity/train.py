"""Training of the correlation-driven learned similarity on simulated frames of the example CT.

    python -m reg2d3d_ros.similarity.train --out models/similarity [--quality tiny|quick|full]
    torchrun --nproc_per_node=N -m reg2d3d_ros.similarity.train ...   # DistributedDataParallel

Training frames are simulated X-rays of the *training* vertebrae (default T3, T4, T5, T7, T9 and
T11, the last one validating; the evaluation's test vertebrae T6, T8, T10, T12 are never used):
AP and lateral views with jittered angles (10 deg) and isocentre (15 mm). Per frame, moving DRRs
of the target at perturbations drawn like the seed's starts (half of them scaled down towards
the truth) with their pose Jacobians (:func:`similarity_samples`)
are computed once and cached under ``--cache`` (resumable). Training writes a checkpoint per
epoch and resumes from it. Output: ``OUT/similarity.pt`` and ``OUT/similarity.json`` (metadata,
per-epoch history, and the same validation angles for NCC and gradient correlation).

Pose parameters
---------------
A training sample is the X-ray frame of a case at its true pose ``T_gt`` and a moving DRR of the
target at ``T(xi) = P(xi) @ T_gt`` (:func:`reg2d3d_ros.intensity.register.perturb_about`:
``xi = (w [rad], v [mm])`` rotates about the target's centre ``c`` in the optical frame and moves
``c`` by ``v``). Rotations are compared with translations in *scaled* parameters
``u = (rho w, v)`` (mm; ``rho`` = :data:`ROT_RADIUS_MM`, about a vertebra's radius), in which the
geodesic loss is ``L_geo = |u|^2`` and its gradient points along ``u``.

Gradient-approximation loss
---------------------------
The network's dissimilarity ``L_net(I_x, I_m(xi))`` should have its gradient with respect to the
pose along the gradient of ``L_geo``, so that gradient descent on ``L_net`` walks towards the
truth from far away (a convex-shaped similarity). The pose gradient is
``dL_net/dxi = J^T dL_net/dI_m`` with ``J = dI_m/dxi`` ``(6, S, S)``, the Jacobian of the DRR,
which is computed once per sample by central finite differences of the renderer
(:func:`similarity_samples`) and cached: training never renders, and only the network (not the
renderer's ``grid_sample``) is differentiated twice. ``L_appro`` is the geodesic distance on the
sphere between the two gradient directions (in ``u``), the angle in radians.

Decomposition loss
------------------
``L_decomp = (NCC(G_x, G_m) + 1) / (NCC(L_x, L_m) + 1 + eps)`` with ``G``/``L`` the global and
local branch features of the fixed and moving images: the seed's ``NCC(G)/NCC(L) + eps`` made
positive and bounded (both correlations lie in ``[-1, 1]``). It drives the local features of
the two images to correlate (the target's edges, present in both) and the global ones to carry
what differs (the rest of the anatomy, soft tissue).

The two losses are combined with learned uncertainty weights
``L = L_appro / (2 s1^2) + L_decomp / (2 s2^2) + log s1 + log s2``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ConfigError, run_cli
from ..eval.starts import seed_like_perturbations
from ..training import (cached_training_frames, constant_then_cosine_lr, distributed, resume, save_checkpoint, set_lr, training_parser,
                        training_setup)
from .model import LearnedSimilarity

#: Radius that turns rotations (rad) into displacements (mm) when poses are compared, mm.
ROT_RADIUS_MM = 30.0

QUALITY = {
    # frames per (vertebra, view), samples per frame and view, epochs
    "tiny": (1, 4, 2),
    "quick": (6, 40, 20),
    "full": (8, 48, 30),
}


# -- poses and losses ----------------------------------------------------------------------------
def scaled_parameters(xi: torch.Tensor, rho_mm: float = ROT_RADIUS_MM) -> torch.Tensor:
    """``(..., 6)`` ``u = (rho w, v)`` (mm) of ``xi = (w [rad], v [mm])``."""
    s = torch.tensor([rho_mm] * 3 + [1.0] * 3, dtype=xi.dtype, device=xi.device)
    return xi * s


#: Indices of the in-plane parameters of ``xi``: rotation about the optical axis, image-plane translation.
IN_PLANE = (2, 3, 4)


def gradient_angle(grad_xi: torch.Tensor, xi: torch.Tensor, rho_mm: float = ROT_RADIUS_MM, clamp: float = 1e-4, dims=None) -> torch.Tensor:
    """Angle (rad, ``(B,)``) between a pose gradient and the geodesic loss gradient, in scaled parameters.

    Parameters
    ----------
    grad_xi : torch.Tensor
        ``(B, 6)`` gradient of a dissimilarity with respect to ``xi`` (per rad, per mm).
    xi : torch.Tensor
        ``(B, 6)`` perturbations from the truth (rad, mm).
    dims : sequence of int, optional
        Compare only these parameters (e.g. :data:`IN_PLANE`); default all six.

    Returns
    -------
    torch.Tensor
        ``(B,)`` angles in ``[0, pi]``: 0 when descending the dissimilarity walks straight to the
        truth, ``pi/2`` when it does not help, ``pi`` when it walks away. The cosine is clamped to
        ``1 - clamp`` so the angle's gradient stays finite.
    """
    s = torch.tensor([rho_mm] * 3 + [1.0] * 3, dtype=grad_xi.dtype, device=grad_xi.device)
    g_u = grad_xi / s  # d/du = d/dxi / s
    target = xi.to(grad_xi.dtype) * s
    if dims is not None:
        g_u, target = g_u[..., list(dims)], target[..., list(dims)]
    cos = F.cosine_similarity(g_u, target, dim=-1, eps=1e-12)
    return torch.acos(cos.clamp(-1 + clamp, 1 - clamp))


def feature_ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample NCC ``(B,)`` of feature maps ``(B, C, h, w)`` (over all channels and pixels)."""
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.pow(2).sum(dim=1).sqrt() * b.pow(2).sum(dim=1).sqrt() + eps)


def decomposition_loss(feats: dict, eps: float = 0.01) -> torch.Tensor:
    """``(B,)`` correlation-driven decomposition loss (module doc) of :meth:`SimilarityNet.forward` features."""
    return (feature_ncc(feats["global_x"], feats["global_m"]) + 1.0) / (feature_ncc(feats["local_x"], feats["local_m"]) + 1.0 + eps)


# -- training samples -----------------------------------------------------------------------------
def similarity_samples(reg, image_att, intrinsics, T_gt: torch.Tensor, n: int, seed: int, level: float = 0.5,
                       near_fraction: float = 0.5, near_scale=(0.03, 0.4), h_rot_rad: float = 0.01, h_trans_mm: float = 0.5) -> dict:
    """Training samples of one case: ``n`` moving DRRs about the truth with their pose Jacobians.

    A fraction ``near_fraction`` of the perturbations is drawn like the seed's starts scaled by a
    factor uniform in ``near_scale`` (close to the truth, where the fine alignment is learned); the
    rest like the seed's starts (:func:`reg2d3d_ros.eval.starts.seed_like_perturbations`).

    Parameters
    ----------
    reg : IntensityRegistrator
        Registrator of the case's target (renders the moving images, gives the centre).
    image_att : np.ndarray
        ``(H, W)`` attenuation-like frame of the case.
    intrinsics : CArmIntrinsics
        Camera of the frame.
    T_gt : torch.Tensor
        ``(4, 4)`` true pose, mm.
    n : int
        Perturbations.
    seed : int
        Seed of the draws.
    level : float
        Resolution factor of the samples (0.5 of a 256 frame gives the network's 128).
    h_rot_rad, h_trans_mm : float
        Central finite-difference steps of the Jacobian.

    Returns
    -------
    dict
        ``fixed`` ``(S, S)`` float32 frame at the level; ``moving`` ``(n, S, S)`` float32 DRRs;
        ``jac`` ``(n, 6, S, S)`` float16 ``dI_m/dxi`` (per rad, per mm); ``xi`` ``(n, 6)`` float64.
    """
    from ..drr import downsample
    from ..intensity.register import perturb_about

    rng = np.random.default_rng(seed)
    T_gt = torch.as_tensor(T_gt, dtype=torch.float64)
    n_near = int(round(n * near_fraction))
    xi_near, _ = seed_like_perturbations(T_gt, reg.center_ct_mm, intrinsics, n_near, rng, scale=lambda r: r.uniform(*near_scale))
    xi_far, _ = seed_like_perturbations(T_gt, reg.center_ct_mm, intrinsics, n - n_near, rng)
    xi = torch.cat([xi_near, xi_far])
    intr = intrinsics.scaled(level)
    fixed = downsample(torch.as_tensor(np.asarray(image_att, dtype=np.float32))[None], level)[0]
    c_opt = reg._center_opt(T_gt)
    steps = torch.tensor([h_rot_rad] * 3 + [h_trans_mm] * 3, dtype=torch.float64)
    delta = torch.cat([torch.diag(steps), -torch.diag(steps)])  # (12, 6)
    moving, jac = [], []
    with torch.no_grad():
        for k in range(n):
            xs = torch.cat([xi[k : k + 1], xi[k] + delta])  # (13, 6)
            img = reg.render(perturb_about(xs, c_opt[None]) @ T_gt, intr).cpu()
            moving.append(img[0])
            jac.append(((img[1:7] - img[7:13]) / (2 * steps[:, None, None].float())).half())
    return {"fixed": fixed.float().contiguous(), "moving": torch.stack(moving), "jac": torch.stack(jac), "xi": xi}


# -- training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimilarityTrainConfig:
    """Training settings (Adam; constant learning rate, then a cosine decay over the last third)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    input_size: int = 128
    channels: int = 24
    coupling_blocks: int = 2
    heads: int = 4
    rot_radius_mm: float = ROT_RADIUS_MM
    decomp_eps: float = 0.01


def _index(samples: list) -> list:
    return [(i, k) for i, s in enumerate(samples) for k in range(len(s["xi"]))]


def _batch(samples: list, idx: list, device) -> tuple:
    fixed = torch.stack([samples[i]["fixed"] for i, _ in idx])[:, None].to(device)
    moving = torch.stack([samples[i]["moving"][k] for i, k in idx])[:, None].to(device)
    jac = torch.stack([samples[i]["jac"][k] for i, k in idx]).to(device=device, dtype=torch.float32)
    xi = torch.stack([samples[i]["xi"][k] for i, k in idx]).to(device=device, dtype=torch.float32)
    return fixed, moving, jac, xi


def losses(net, fixed, moving, jac, xi, cfg: SimilarityTrainConfig, create_graph: bool = True) -> dict:
    """``L_appro`` and ``L_decomp`` per sample (``(B,)`` each) and the pose gradient ``(B, 6)`` of a batch.

    ``fixed``, ``moving``: ``(B, 1, S, S)``; ``jac``: ``(B, 6, S, S)`` ``dI_m/dxi``; ``xi``: ``(B, 6)``.
    """
    moving = moving.detach().requires_grad_(True)
    l_net, feats = net(fixed, moving, return_features=True)
    (g_img,) = torch.autograd.grad(l_net.sum(), moving, create_graph=create_graph)
    g_xi = torch.einsum("bkhw,bhw->bk", jac, g_img[:, 0])
    return {"appro": gradient_angle(g_xi, xi, cfg.rot_radius_mm), "decomp": decomposition_loss(feats, cfg.decomp_eps), "grad_xi": g_xi}


def baseline_angles(samples: list, metric, rho_mm: float = ROT_RADIUS_MM, dims=None) -> np.ndarray:
    """Gradient angles (deg) of a hand-made metric (e.g. :func:`.metrics.gradient_correlation`) on samples, for comparison."""
    out = []
    for s in samples:
        m = s["moving"].double().requires_grad_(True)
        sim = metric(m, s["fixed"].double())
        (g,) = torch.autograd.grad((-sim).sum(), m)
        g_xi = torch.einsum("bkhw,bhw->bk", s["jac"].double(), g)
        out.append(torch.rad2deg(gradient_angle(g_xi, s["xi"], rho_mm, dims=dims)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _evaluate(net, samples: list, cfg: SimilarityTrainConfig, device) -> dict:
    idx = _index(samples)
    ang, dec, inp = [], [], []
    net.eval()
    for b in range(0, len(idx), 64):
        f, m, j, x = _batch(samples, idx[b : b + 64], device)
        out = losses(net, f, m, j, x, cfg, create_graph=False)
        ang.append(torch.rad2deg(out["appro"]).detach().cpu())
        inp.append(torch.rad2deg(gradient_angle(out["grad_xi"].detach(), x, cfg.rot_radius_mm, dims=IN_PLANE)).cpu())
        dec.append(out["decomp"].detach().cpu())
    net.train()
    a = torch.cat(ang).numpy() if ang else np.zeros(0)
    ai = torch.cat(inp).numpy() if inp else np.zeros(0)
    return {"val_inplane_angle_mean_deg": float(ai.mean()) if ai.size else float("nan"),"val_angle_mean_deg": float(a.mean()) if a.size else float("nan"), "val_angle_median_deg": float(np.median(a)) if a.size else float("nan"),
            "val_descent_fraction": float(np.mean(a < 90.0)) if a.size else float("nan"),
            "val_decomp": float(torch.cat(dec).mean()) if dec else float("nan")}


def train_similarity(train: list, val: list, cfg: SimilarityTrainConfig, checkpoint: Path | None = None, device: str = "cpu",
                     progress: bool = True) -> tuple:
    """Train the learned similarity on cached samples (:func:`similarity_samples`), resumable.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the network is wrapped in PyTorch's
    DistributedDataParallel and each rank takes its share of every epoch's shuffled batches;
    rank 0 validates and writes the checkpoints. The model of the epoch with the lowest
    validation angle is returned.

    Returns
    -------
    tuple
        ``(LearnedSimilarity, history)``; ``history`` has one dict per epoch.
    """
    from ..nets.similarity import SimilarityNet
    from ..progress import bar, end_line

    if not train:
        raise ConfigError("no training samples")
    rank, world = distributed()
    torch.manual_seed(cfg.seed)
    net = SimilarityNet(cfg.input_size, cfg.channels, cfg.coupling_blocks, cfg.heads).to(device)
    log_sigma = torch.nn.Parameter(torch.zeros(2, device=device))
    trainable = _WithSigma(net, log_sigma)  # one module: DDP synchronises the uncertainty weights too
    params = list(net.parameters()) + [log_sigma]  # explicit order: the optimizer state in checkpoints follows it
    opt = torch.optim.Adam(params, lr=cfg.lr)
    meta = {"config": asdict(cfg), "n_train": len(_index(train)), "n_val": len(_index(val))}
    history, start, best_state = [], 0, None
    if checkpoint is not None:
        history, start, resumed = resume(Path(checkpoint), meta, trainable, opt)
        if resumed and progress and rank == 0:
            print(f"resuming the learned similarity at epoch {start}", file=sys.stderr)
    model = trainable
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(trainable, device_ids=[torch.cuda.current_device()] if str(device).startswith("cuda") else None)
    idx = _index(train)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        set_lr(opt, constant_then_cosine_lr(cfg.lr, cfg.epochs, epoch))
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(idx))
        batches = [order[b : b + cfg.batch_size] for b in range(0, len(order), cfg.batch_size)]
        batches = batches[rank::world]
        tot = {"appro": 0.0, "decomp": 0.0, "loss": 0.0}
        for bi, sel in enumerate(batches):
            f, m, j, x = _batch(train, [idx[i] for i in sel], device)
            out = losses(model, f, m, j, x, cfg)
            l_appro, l_decomp = out["appro"].mean(), out["decomp"].mean()
            loss = 0.5 * torch.exp(-2 * log_sigma[0]) * l_appro + 0.5 * torch.exp(-2 * log_sigma[1]) * l_decomp + log_sigma.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            tot["appro"] += float(l_appro.detach())
            tot["decomp"] += float(l_decomp.detach())
            tot["loss"] += float(loss.detach())
            if progress and rank == 0:
                bar(f"similarity epoch {epoch + 1}/{cfg.epochs}", bi + 1, len(batches), time.time() - t0)
        if rank != 0:
            continue
        row = {"epoch": epoch, "lr": constant_then_cosine_lr(cfg.lr, cfg.epochs, epoch), "seconds": round(time.time() - t0, 1)}
        row |= {f"train_{k}": v / max(1, len(batches)) for k, v in tot.items()}
        row["train_angle_deg"] = math.degrees(row["train_appro"])
        row["sigma"] = [float(s) for s in torch.exp(log_sigma.detach()).cpu()]
        row |= _evaluate(net, val, cfg, device)
        history.append(row)
        if progress:
            end_line()
            print(f"epoch {epoch + 1}: train angle {row['train_angle_deg']:.1f} deg, decomp {row['train_decomp']:.3f}; "
                  f"val angle mean {row['val_angle_mean_deg']:.1f} median {row['val_angle_median_deg']:.1f} deg, "
                  f"descent {100 * row['val_descent_fraction']:.0f} %, in-plane angle {row['val_inplane_angle_mean_deg']:.1f} deg", file=sys.stderr)
        if checkpoint is not None:
            save_checkpoint(Path(checkpoint), epoch, trainable, opt, meta, history)
            best_epoch = min(range(len(history)), key=lambda i: history[i]["val_angle_mean_deg"])
            if best_epoch == len(history) - 1:
                torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, Path(checkpoint).with_suffix(".best"))
        elif best_state is None or row["val_angle_mean_deg"] <= min(h["val_angle_mean_deg"] for h in history):
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if world > 1:
        torch.distributed.barrier()
    best = Path(checkpoint).with_suffix(".best") if checkpoint is not None else None
    if best is not None and best.exists():
        net.load_state_dict(torch.load(best, map_location=device, weights_only=True))
    elif best_state is not None:
        net.load_state_dict(best_state)
    best_epoch = min(range(len(history)), key=lambda i: history[i]["val_angle_mean_deg"]) if history else None
    return LearnedSimilarity(net.cpu(), meta | {"best_epoch": best_epoch}), history


class _WithSigma(torch.nn.Module):
    """The network and the uncertainty weights as one module (checkpoints, DDP); calls the network."""

    def __init__(self, net, log_sigma):
        super().__init__()
        self.net = net
        self.log_sigma = log_sigma

    def forward(self, fixed, moving, return_features: bool = False):
        return self.net(fixed, moving, return_features=return_features)


# -- the command ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = training_parser("python -m reg2d3d_ros.similarity.train", __doc__.split("\n\n")[0], "models/similarity", "build/similarity_cache",
                         "similarity.pt / similarity.json", QUALITY, ("--samples", "moving images per frame and view"), 256, 4000)
    ap.add_argument("--input-size", type=int, default=128, help="network input, pixels (size / 2 avoids resizing)")
    ap.add_argument("--device", default="cpu", help="training device (cpu, cuda, cuda:N; under torchrun each rank takes its local GPU)")
    return ap


def collect(ct, vertebrae, frames_per_view: int, n_samples: int, size: int, seed: int, cache: Path, progress: bool = True,
            physics: str = "nominal") -> dict:
    """``{vertebra: [sample dict, ...]}`` (one dict per case), computing and caching what is missing."""
    from ..intensity import IntensityRegistrator

    def per_frame(reg, cases):
        return [similarity_samples(reg, c.image_att, c.intrinsics, c.T_gt, n_samples, seed=c.seed + 7) for c in cases]

    out = {}
    for vert, rows in cached_training_frames(ct, vertebrae, frames_per_view, n_samples, 30.0, size, seed, cache, "sim_", per_frame,
                                             "similarity samples", progress, make_registrator=IntensityRegistrator.from_ct,
                                             physics=physics):
        out.setdefault(vert, []).extend(rows)
    return out


def _run(args) -> int:
    import os

    import torch

    from ..intensity.metrics import gradient_correlation, ncc

    args.starts = args.samples
    ct, vertebrae, frames, samples, epochs = training_setup(args, QUALITY)
    if args.input_size % 8 or args.input_size < 16:
        raise ConfigError(f"--input-size must be a multiple of 8 and at least 16, got {args.input_size}")
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here")
    from ..progress import Steps

    t0 = time.time()
    step = Steps(3, stream=sys.stderr, enabled=int(os.environ.get("RANK", "0")) == 0)
    step(f"collecting training samples of {', '.join(vertebrae)} (cached in {args.cache})")
    data = collect(ct, vertebrae, frames, samples, args.size, args.seed, args.cache, physics=args.physics)
    t_data = time.time() - t0
    train = [s for v in vertebrae[:-1] for s in data[v]]
    val = data[vertebrae[-1]]
    n_tr, n_va = sum(len(s["xi"]) for s in train), sum(len(s["xi"]) for s in val)
    step.note(f"{n_tr} training, {n_va} validation samples ({t_data:.0f} s)")
    cfg = SimilarityTrainConfig(epochs=epochs, input_size=args.input_size, seed=args.seed)
    step(f"training the learned similarity ({epochs} epochs, device {device})")
    model, hist = train_similarity(train, val, cfg, checkpoint=args.cache / f"similarity_s{args.seed}_{'-'.join(vertebrae)}_f{frames}_n{samples}.ckpt", device=device)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    baselines = {}
    step("validation angles of gradient correlation and NCC (the baselines)")
    for name, fn in (("gc", gradient_correlation), ("ncc", ncc)):
        a = baseline_angles(val, fn, cfg.rot_radius_mm)
        ai = baseline_angles(val, fn, cfg.rot_radius_mm, dims=IN_PLANE)
        baselines[name] = {"val_angle_mean_deg": float(a.mean()), "val_angle_median_deg": float(sorted(a)[len(a) // 2]),
                           "val_descent_fraction": float((a < 90).mean()), "val_inplane_angle_mean_deg": float(ai.mean())}
    meta = {"vertebrae": vertebrae, "frames_per_view": frames, "samples": samples, "size": args.size, "epochs": epochs, "seed": args.seed,
            "seconds_data": round(t_data), "seconds_total": round(time.time() - t0), "baselines_unmasked": baselines}
    model.meta.update(meta)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "similarity.pt")
    (args.out / "similarity.json").write_text(json.dumps({"meta": model.meta, "history": hist}, indent=1))
    best = hist[model.meta["best_epoch"]] if hist else {}
    if best:
        print(f"learned: validation gradient angle mean {best['val_angle_mean_deg']:.1f} deg, median {best['val_angle_median_deg']:.1f}, "
              f"descent {100 * best['val_descent_fraction']:.0f} %, in-plane {best['val_inplane_angle_mean_deg']:.1f} deg (epoch {best['epoch'] + 1})")
    for name, b in baselines.items():
        print(f"{name}: validation gradient angle mean {b['val_angle_mean_deg']:.1f} deg, median {b['val_angle_median_deg']:.1f}, "
              f"descent {100 * b['val_descent_fraction']:.0f} %, in-plane {b['val_inplane_angle_mean_deg']:.1f} deg")
    print(f"wrote {args.out / 'similarity.pt'} ({round(time.time() - t0)} s)")
    return 0


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "python -m reg2d3d_ros.similarity.train")


if __name__ == "__main__":
    sys.exit(main())
