"""The demo on the built-in example (README command 1), through the ROS 2 node.

Simulates a fluoroscopy sequence around one thoracic vertebra of the example CT (simulated
frames: there is no real X-ray with a known pose here) and writes it as a rosbag2 bag. By
default the frames come from the domain-randomised simulator (:mod:`reg2d3d_ros.sim.randomize`:
one seeded draw of the physics, the display and the encoding, not the settings the node was
tuned on) and the motion is a short C-arm sweep with the patient breathing (out-of-plane
rotation: the node must track in 6 degrees of freedom). It starts the registration node as a
process on its own DDS domain with the example's SCR model (``models/example_T8``), so that it
initialises itself (SCR-PnP, refined by PPC; ``--init ground-truth`` gives it frame 0's true
pose instead); replays the bag into it (in lock-step: each frame when the node is done with the
previous one; ``--realtime``: lock-step until its first pose, then at 15 frames/s, the node
dropping what it cannot keep up with); collects the node's poses, TF and overlays; and scores
every frame against the ground truth: answered (a pose; wrong when its mRPD exceeds 2 mm),
refused (processed, no pose: judged lost or initialisation rejected) or dropped (newest frame
wins). Output, in a folder whose
path it prints: the node's overlay of every frame it processed, an animation of the whole
sequence beside the per-frame error plot, an overview picture, the plot, the bag, the node's
log and a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import Reg2D3DError, run_cli

#: Trajectories of ``--trajectory``: the simulator's, and ``sweep`` (the default): a C-arm
#: sweep of :data:`SWEEP_LAO_DEG_PER_FRAME` about the isocentre (and a quarter of it cranial)
#: with the patient breathing and drifting (:func:`reg2d3d_ros.sim.trajectory.smooth_patient_motion`).
TRAJECTORIES = ("sweep", "static", "smooth", "carm_rotation", "jumps")
#: LAO rotation of the ``sweep`` trajectory per frame (the benchmark's sweep rate; 24 deg over 60 frames).
SWEEP_LAO_DEG_PER_FRAME = 0.4
#: Frame rate of the animation (the sequence was recorded at 15 frames/s: shown 2.5 times slower).
ANIMATION_FPS = 6.0
#: Height of the panels of the animation, pixels.
PANEL_PX = 384
#: The randomised draw the demo shows by default (``--domain-seed``): noisy 8-bit attenuation frames
#: (2100 photons per pixel), a strong bone contrast, a tilted rectangular collimator, a wire. Not
#: chosen for being easy: of the draws 0-8 on frame 0 of this sequence, the node's initialisation
#: was right (mRPD < 1 mm) on 1, 2, 4 and 6, 2.5 mm off on 3, wrong (12 and 25 mm) on 5 and 8 and
#: refused by SCR on 0 and 7; 1 is the first that the node registers.
DEFAULT_DOMAIN_SEED = 1
#: Status of a frame.
ANSWERED, REFUSED, DROPPED, NOT_RECEIVED, NO_ANSWER = "answered", "refused", "dropped", "not received", "no answer"
#: Statuses of frames the node did not process (or that cannot be told apart from one).
NOT_PROCESSED = (DROPPED, NOT_RECEIVED, NO_ANSWER)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: ./demo_output)")
    ap.add_argument("--vertebra", default="T8")
    ap.add_argument("--view", default="lateral", help="ap, lateral, oblique, rao, or 'LAO,CRAN' in degrees")
    ap.add_argument("--init", choices=["scr", "ground-truth"], default="scr",
                    help="scr: the node initialises itself with its SCR model; ground-truth: publish frame 0's true pose")
    ap.add_argument("--models", type=Path, default=None, help="SCR model folder (default: the package's models/example_T8)")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--trajectory", default="sweep", choices=TRAJECTORIES,
                    help="sweep (default): C-arm sweep of 0.4 deg/frame with breathing; or the simulator's trajectories")
    ap.add_argument("--physics", default="randomised", choices=["randomised", "nominal"],
                    help="randomised (default): one seeded draw of the domain-randomised simulator (physics, display, encoding, "
                         "collimator, objects); nominal: the settings the node was tuned on")
    ap.add_argument("--objects", default="wire", choices=["none", "wire", "screw", "both"],
                    help="objects of the nominal physics (the randomised draw brings its own)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the motion and the noise")
    ap.add_argument("--domain-seed", type=int, default=DEFAULT_DOMAIN_SEED,
                    help=f"randomised physics: the draw (sim.randomize.domain_from_seed; default {DEFAULT_DOMAIN_SEED}, see the README)")
    replay = ap.add_mutually_exclusive_group()
    replay.add_argument("--lockstep", action="store_true",
                        help="(the default) send each frame after the node is done with the previous one: every frame processed")
    replay.add_argument("--realtime", action="store_true",
                        help="lock-step until the node's first pose (its initialisation), then at --rate: the node drops what it cannot keep up with")
    replay.add_argument("--no-init-wait", action="store_true",
                        help="at --rate from frame 0 (frames arriving while the node initialises are dropped)")
    ap.add_argument("--rate", type=float, default=1.0, help="replay rate of --realtime and --no-init-wait (1 = recorded pace, 15 frames/s)")
    return ap


# -- the sequence ---------------------------------------------------------------------------------
def parse_view(text: str):
    """A view name or ``'LAO,CRAN'`` degrees."""
    if "," in text:
        lao, cran = (float(x) for x in text.split(","))
        return (lao, cran)
    return text


def demo_poses(kind: str, center, setup, view, n_frames: int, seed: int) -> torch.Tensor:
    """Ground-truth poses of a demo trajectory.

    ``sweep``: the C-arm turns about the target by :data:`SWEEP_LAO_DEG_PER_FRAME` LAO (and a
    quarter of that caudal) per frame while the patient breathes and drifts (2 mm breathing at
    0.25 Hz, up to 3 mm and 2 deg of drift, about the target); the others are the simulator's.

    Parameters
    ----------
    kind : str
        One of :data:`TRAJECTORIES`.
    center : array-like
        ``(3,)`` target centre, CT mm (the isocentre and the centre of the patient's motion).
    setup : CArmSetup
        The C-arm (source-isocentre distance).
    view : str or tuple
        A view name or ``(LAO, CRAN)`` degrees.
    n_frames : int
        Number of frames.
    seed : int
        Seed of the patient's drift.

    Returns
    -------
    torch.Tensor
        ``(F, 4, 4)`` float64 ``T_optical_from_ct``, mm.
    """
    from .sim import make_trajectory, view_pose
    from .sim.scenarios import VIEWS
    from .sim.trajectory import carm_rotation, smooth_patient_motion

    T0 = view_pose(center, setup, view)
    if kind != "sweep":
        return make_trajectory(kind, T0, n_frames, center, setup, view=view, seed=seed)
    lao, cran = VIEWS[view] if isinstance(view, str) else view
    span = SWEEP_LAO_DEG_PER_FRAME * (n_frames - 1)
    sweep = carm_rotation(center, setup.sid_mm, n_frames, lao, lao + span, cran, cran - 0.25 * span)
    patient = smooth_patient_motion(T0, n_frames, center, seed=seed)  # T0 @ M_f
    return sweep @ (torch.linalg.inv(T0)[None] @ patient)


def _components(ct, intrinsics, poses: torch.Tensor, bar) -> np.ndarray:
    """Line-integral components ``(F, 2, H, W)`` of the randomised simulator, cached by pose and camera."""
    from .example import cache_dir
    from .sim import randomize as rz

    key = hashlib.sha256(np.ascontiguousarray(poses.numpy()).tobytes() + repr(intrinsics).encode() + ct.source.encode()).hexdigest()[:16]
    path = cache_dir() / "demo" / f"components_{key}.npy"
    if path.is_file():
        try:
            comps = np.load(path)
            if comps.shape[:2] == (len(poses), 2):
                bar.update(len(poses), "(cached)")
                return comps
        except (OSError, ValueError):
            pass
    binned = ct.binned((2, 2, 1))  # what render_components(binning=2) renders, binned once for every frame
    comps = []
    for f in range(len(poses)):
        comps.append(rz.render_components(binned, intrinsics, poses[f:f + 1], binning=1)[0])
        bar.update(f + 1)
    comps = np.stack(comps).astype(np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, comps)
        tmp.replace(path)
    except OSError:
        pass  # a cache that cannot be written only costs time
    return comps


def simulate(args, ct, center, note) -> tuple:
    """Simulate the demo's frames.

    Parameters
    ----------
    args : argparse.Namespace
        The demo's options (``size``, ``view``, ``trajectory``, ``frames``, ``seed``,
        ``physics``, ``domain_seed``, ``objects``).
    ct : CTVolume
        The example CT.
    center : array-like
        ``(3,)`` target centre, CT mm.
    note : callable
        Prints a detail line (:meth:`reg2d3d_ros.progress.Steps.note`).

    Returns
    -------
    tuple
        ``(SimulatedSequence, dict)``: the frames (encoded as they go on ``/carm/image``) and a
        JSON-ready description of their physics.
    """
    from .progress import Bar
    from .sim import CArmSetup, XrayDegradation, make_objects, simulate_sequence, xray_renderer

    setup = CArmSetup().at_size(args.size)
    view = parse_view(args.view)
    poses = demo_poses(args.trajectory, center, setup, view, args.frames, args.seed)
    meta = {"vertebra": args.vertebra, "view": args.view, "trajectory": args.trajectory}
    if args.physics == "nominal":
        seq = simulate_sequence(xray_renderer(ct), setup.intrinsics(), poses, XrayDegradation(), seed=args.seed,
                                objects=make_objects(args.objects, center), progress=True, meta=meta)
        return seq, {"physics": "nominal (the settings the node was tuned on)", "objects": args.objects}
    from .sim import randomize as rz

    draw = rz.domain_from_seed(args.domain_seed)
    with Bar("rendering frames", len(poses)) as bar:
        comps = _components(ct, setup.intrinsics(), poses, bar)
    seq = rz.simulate_randomised_sequence(comps, poses, setup.intrinsics(), draw, seed=args.seed, meta=meta)
    desc = {"physics": f"randomised (sim.randomize, domain seed {draw.seed})", "display": draw.display, "encoding": draw.encoding,
            "bit_depth": draw.bit_depth, "photons_per_pixel": round(draw.photons_per_pixel or 0), "bone_contrast": round(draw.bone_contrast, 2),
            "scatter_fraction": round(draw.scatter_fraction, 2), "blur_sigma_px": round(draw.blur_sigma_px, 2), "collimator": draw.collimator,
            "wires": len(draw.wires), "screws": len(draw.screws)}
    note(f"physics: randomised draw {draw.seed}: {draw.display} display, {draw.encoding} ({draw.bit_depth} bit), "
         f"{desc['photons_per_pixel']} photons/pixel, bone contrast {desc['bone_contrast']}, scatter {desc['scatter_fraction']}, "
         f"blur {desc['blur_sigma_px']} px, {draw.collimator} collimator, {len(draw.wires)} wire(s), {len(draw.screws)} screw(s)")
    return seq, desc


# -- the pictures ---------------------------------------------------------------------------------
def _stamp(header) -> int:
    return header.stamp.sec * 10**9 + header.stamp.nanosec


def _image_of(msg) -> np.ndarray:
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3).copy()


def frame_picture(seq, i: int, status: str, outline, T_published=None) -> np.ndarray:
    """The demo's own picture of frame ``i``, for a frame whose overlay did not come from the node.

    Parameters
    ----------
    seq : SimulatedSequence
        The sequence.
    i : int
        Frame index.
    status : str
        :data:`ANSWERED` (its overlay was lost on the way: drawn here at ``T_published``, as the
        node draws it), :data:`REFUSED`, :data:`DROPPED`, :data:`NOT_RECEIVED` or :data:`NO_ANSWER` (the frame, a
        border and what happened).
    outline : OutlineOverlay or None
        The target's outline (needed for :data:`ANSWERED`).
    T_published : torch.Tensor, optional
        ``(4, 4)`` float64 published pose, mm.

    Returns
    -------
    np.ndarray
        ``(H, W, 3)`` uint8 RGB.
    """
    from .images import decode_image, encode_image, to_attenuation
    from .viz import RED, YELLOW, legend_lines, overlay_frame

    e = encode_image(seq.images[i], seq.encoding)
    img = to_attenuation(decode_image(e["encoding"], e["height"], e["width"], e["step"], e["data"]), seq.intensity)
    if status == ANSWERED:
        legend = legend_lines("tracking", None, None, outline.target.name, "drawn by the demo: overlay lost")
        return overlay_frame(img, outline, T_published, seq.intrinsics.K(torch.float64), legend)
    text = {DROPPED: "dropped: node busy", REFUSED: "refused: no pose", NOT_RECEIVED: "not received by the node",
            NO_ANSWER: "no answer"}[status]
    rgb = overlay_frame(img, None, None, None, [(text, RED if status == REFUSED else YELLOW)], refused=status == REFUSED)
    if status != REFUSED:
        from .viz import mark_refused

        mark_refused(rgb, colour=(150, 150, 150))
    return rgb


def error_plot(path: Path | None, n: int, answered: np.ndarray, err_mrpd: np.ndarray, hold_mrpd: np.ndarray, status: list, wrong_mm: float,
               title: str, size_px=(540, PANEL_PX)):
    """The per-frame error plot (written to ``path`` unless None).

    Parameters
    ----------
    path : Path or None
        PNG to write.
    n : int
        Frames in the sequence.
    answered : np.ndarray
        ``(A,)`` int indices of the frames with a pose.
    err_mrpd : np.ndarray
        ``(A,)`` mRPD of those poses, mm.
    hold_mrpd : np.ndarray
        ``(n,)`` mRPD of frame 0's true pose on every frame (no tracking), mm.
    status : list of str
        ``(n,)`` status of every frame (:data:`ANSWERED`, :data:`REFUSED`, ...).
    wrong_mm : float
        Error above which a pose is wrong, mm.
    title : str
        Title (its second line after a newline).
    size_px : tuple of int
        ``(width, height)`` of the image, pixels.

    Returns
    -------
    tuple
        ``(image (H, W, 3) uint8 RGB, x_to_pixel, (top, bottom) pixel rows of the axes)``: a
        frame index's column in the image and the rows a cursor spans.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    x_all = np.arange(n)
    lo = 0.05
    ax.plot(x_all, np.maximum(hold_mrpd, lo), "--", color="0.55", lw=1.2, label="if the first pose were held")
    ok = err_mrpd <= wrong_mm
    ax.plot(answered, np.maximum(err_mrpd, lo), "-", color="tab:green", lw=0.8, alpha=0.6)
    ax.plot(answered[ok], np.maximum(err_mrpd[ok], lo), "o", color="tab:green", ms=3.5, label="node's pose (mRPD)")
    if (~ok).any():
        ax.plot(answered[~ok], err_mrpd[~ok], "o", color="tab:red", ms=4.5, label=f"wrong (> {wrong_mm:g} mm)")
    ax.axhline(wrong_mm, color="tab:red", ls=":", lw=1)
    ymax = max(10.0, float(np.nanmax(np.r_[hold_mrpd, err_mrpd])) * 1.5)
    ax.set_yscale("log")
    ax.set_ylim(lo * 0.9, ymax)
    rug_y = lo * 1.25
    ref = [i for i, s in enumerate(status) if s == REFUSED]
    drop = [i for i, s in enumerate(status) if s in NOT_PROCESSED]
    if ref:
        ax.plot(ref, [rug_y] * len(ref), "x", color="tab:red", ms=6, mew=1.5, label="refused (no pose)")
    if drop:
        ax.plot(drop, [rug_y] * len(drop), "|", color="0.4", ms=8, mew=1.2, label="not processed (dropped / lost)")
    ax.set_xlim(-1, n)
    ax.set_xlabel("frame (15 frames/s)", fontsize=8)
    ax.set_ylabel("mRPD of the target [mm]", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=7.5)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="upper left", ncol=2, framealpha=0.85)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    h = rgb.shape[0]
    x0, y0 = ax.transData.transform((0, 1.0))
    x1, _ = ax.transData.transform((1, 1.0))
    bbox = ax.get_window_extent()
    top, bottom = int(h - bbox.y1), int(h - bbox.y0)
    plt.close(fig)
    return rgb, (lambda x: int(round(x0 + (x1 - x0) * x))), (top, bottom)


def animation_frames(pictures: list, plot_rgb: np.ndarray, x_to_px, rows, status: list, errors: dict | None = None, wrong_mm: float = 2.0):
    """The animation's frames: each picture beside the error plot with a cursor on its frame.

    Parameters
    ----------
    pictures : list of np.ndarray
        ``(H, W, 3)`` uint8 RGB picture of every frame (scaled to the plot's height).
    plot_rgb : np.ndarray
        ``(P, Q, 3)`` uint8 RGB plot (:func:`error_plot`).
    x_to_px : callable
        Frame index to the plot's pixel column.
    rows : tuple of int
        Pixel rows the cursor spans.
    status : list of str
        Every frame's status (the cursor's colour and the caption).
    errors : dict, optional
        ``{frame: mRPD (mm)}`` of the answered frames, for the caption (a wrong one's cursor is red).
    wrong_mm : float
        Error above which a pose is wrong, mm.

    Yields
    ------
    np.ndarray
        ``(P, Q + W', 3)`` uint8 RGB.
    """
    import cv2

    from .viz import draw_legend

    colours = {ANSWERED: (40, 160, 40), REFUSED: (220, 40, 40), DROPPED: (120, 120, 120), NOT_RECEIVED: (120, 120, 120),
               NO_ANSWER: (120, 120, 120)}
    ph = plot_rgb.shape[0]
    for i, pic in enumerate(pictures):
        left = cv2.resize(pic, (int(round(pic.shape[1] * ph / pic.shape[0])), ph), interpolation=cv2.INTER_LINEAR)
        right = plot_rgb.copy()
        x = x_to_px(i)
        colour, text = colours[status[i]], f"frame {i + 1}/{len(pictures)}: {status[i]}"
        if errors is not None and i in errors:
            text += f", mRPD {errors[i]:.1f} mm" + (" (wrong)" if errors[i] > wrong_mm else "")
            colour = colours[REFUSED] if errors[i] > wrong_mm else colour
        cv2.line(right, (x, rows[0]), (x, rows[1]), colour, 2)
        draw_legend(right, [(text, colour)], corner="bottom-left")
        yield np.concatenate([left, right], axis=1)


def write_gif(path: Path, frames, fps: float) -> int:
    """Write an animated GIF (Pillow; a 256-colour octree palette per frame, no dithering, looping).

    The octree keeps the outline's and the markers' saturated colours (median cut spent the
    palette on the frame's greys and darkened them) and gives smaller files.

    Parameters
    ----------
    path : Path
        The ``.gif`` to write.
    frames : iterable of np.ndarray
        ``(H, W, 3)`` uint8 RGB frames, all of one size.
    fps : float
        Frames per second of the animation.

    Returns
    -------
    int
        The number of frames written.
    """
    from PIL import Image

    images = [Image.fromarray(f).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE) for f in frames]
    if not images:
        raise Reg2D3DError("no frames to animate")
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0, optimize=False, disposal=1)
    return len(images)


def overview_picture(path: Path, pictures: list, status: list, plot) -> None:
    """Three frames (the first answered, one refused or the middle one, the last answered) above the error plot, in one PNG.

    ``plot(width_px)`` returns the error plot's image at that width (:func:`error_plot`). This
    is the README's picture.
    """
    import cv2

    answered = [i for i, s in enumerate(status) if s == ANSWERED]
    refused = [i for i, s in enumerate(status) if s == REFUSED and (not answered or i > answered[0])]
    if len(answered) >= 2:
        picks = [answered[0], refused[len(refused) // 2] if refused else answered[len(answered) // 2], answered[-1]]
    else:
        picks = list(range(min(3, len(pictures))))
    tw = max(PANEL_PX * 3 // len(picks), max(p.shape[1] for p in pictures))
    row = np.concatenate([cv2.resize(pictures[i], (tw, int(round(pictures[i].shape[0] * tw / pictures[i].shape[1]))),
                                     interpolation=cv2.INTER_LINEAR if pictures[i].shape[1] < tw else cv2.INTER_AREA) for i in picks], axis=1)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([row, plot(row.shape[1])], axis=0), cv2.COLOR_RGB2BGR))


# -- the run --------------------------------------------------------------------------------------
def run(args) -> Path:
    """Run the demo; returns the output folder."""
    import cv2

    from .eval import mrpd, mtre
    from .eval.benchmark import WRONG_MRPD_MM
    from .example import example_paths
    from .geometry import pose_m_to_transform
    from .progress import Steps
    from .sim import structure_center
    from .sim.bag import write_sequence_bag
    from .viz import OutlineOverlay
    from .volume import load_ct, resolve_label

    t_start = time.perf_counter()
    step = Steps(5)
    out = args.out.resolve()
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for old in (out / "overlays").glob("frame_*.png"):  # a previous run's pictures would mix with this one's
        old.unlink()
    ex = example_paths()
    step(f"loading the example CT ({ex.ct.name}, LIDC-IDRI-0001) and labels")
    ct = load_ct(ex.ct, labels_path=ex.labels, label_table=ex.label_table)
    label = resolve_label(args.vertebra, ct.label_names)
    target_pts = torch.from_numpy(ct.label_points_ct_mm([label], max_points=2000, seed=0))
    center = structure_center(ct, args.vertebra)

    step(f"simulating {args.frames} frames around {args.vertebra} ({args.trajectory} motion, {args.view} view, "
         f"{args.size}x{args.size}, {args.physics} physics)")
    seq, physics = simulate(args, ct, center, step.note)
    bag = write_sequence_bag(seq, out / "sequence_bag", overwrite=True)
    step.note(f"wrote the simulated sequence to {bag}")

    from .ros.session import run_bag_through_node

    params = {"ct_path": ex.ct, "labels_path": ex.labels, "label_table_path": ex.label_table, "target": args.vertebra,
              "intensity": seq.intensity}
    T_gt = torch.from_numpy(seq.poses_mm)
    if args.init == "scr":
        models = (args.models or Path(__file__).resolve().parents[1] / "models" / "example_T8").resolve()
        if not (models / "scr.pt").is_file():
            raise Reg2D3DError(f"no SCR model in {models}: create one with python -m reg2d3d_ros.prepare, or use --init ground-truth")
        params["models_dir"] = models

    def log(message: str) -> None:  # the session's "[k/5] ..." lines become this command's steps
        text = message.strip()
        if text[:1] == "[" and "] " in text and "/" in text.split("] ")[0]:
            step(text.split("] ", 1)[1])
        else:
            step.note(text)

    replay = "real time" if args.no_init_wait else ("lock-step until the first pose, then real time" if args.realtime else "lock-step")
    got = run_bag_through_node(bag, params, T_gt[0] if args.init == "ground-truth" else None, out, rate=args.rate, n_frames=len(seq),
                               log=log, lockstep=not args.no_init_wait, lockstep_until_answer=args.realtime)
    poses, n_tf, overlays, diag = got["poses"], got["tf_messages"], got["overlays"], got["diagnostics"]

    step("scoring every frame against the ground truth; writing the overlays, the animation and the plot")
    n = len(seq)
    index = {int(s): i for i, s in enumerate(seq.stamps_ns)}
    published = {}
    for p in poses:
        i = index.get(_stamp(p.header))
        if i is None:
            raise Reg2D3DError("the node published a pose whose stamp matches no frame (headers must be copied)")
        pp, q = p.pose.position, p.pose.orientation
        published[i] = pose_m_to_transform(torch.tensor([pp.x, pp.y, pp.z], dtype=torch.float64),
                                           torch.tensor([q.x, q.y, q.z, q.w], dtype=torch.float64))
    if not published:
        raise Reg2D3DError(f"the node published no pose; its log: {out / 'node.log'}")
    node_pictures = {}
    for m in overlays:
        i = index.get(_stamp(m.header))
        if i is not None:
            node_pictures[i] = _image_of(m)
            cv2.imwrite(str(out / "overlays" / f"frame_{i:03d}.png"), cv2.cvtColor(node_pictures[i], cv2.COLOR_RGB2BGR))
    dropped_total = int(diag.get("frames_dropped") or 0)
    refused_total = int(diag.get("frames_processed") or 0) - int(diag.get("poses_published") or len(published))
    refused_seen = sum(1 for i in node_pictures if i not in published)
    not_received_total = max(0, n - int(diag.get("frames_received") or 0))  # lost on the way to the node
    every_frame_processed = dropped_total == 0 and not_received_total == 0
    status = []
    for i in range(n):
        if i in published:
            status.append(ANSWERED)
        elif i in node_pictures or every_frame_processed:
            status.append(REFUSED)  # the node processed it and published no pose (its overlay says why)
        elif refused_seen >= refused_total:  # every refused frame is accounted for by its overlay: this one was not processed
            status.append(DROPPED if not_received_total == 0 else NOT_RECEIVED if dropped_total == 0 else NO_ANSWER)
        else:
            status.append(NO_ANSWER)  # not processed, or refused with its overlay lost on the way
    answered = np.array(sorted(published))
    T_est = torch.stack([published[i] for i in answered])
    idx = torch.from_numpy(answered)
    err_mrpd = mrpd(T_est, T_gt[idx], target_pts).numpy()
    err_mtre = mtre(T_est, T_gt[idx], target_pts).numpy()
    hold_mrpd = mrpd(T_gt[0].expand_as(T_gt), T_gt, target_pts).numpy()
    wrong = answered[err_mrpd > WRONG_MRPD_MM]

    outline = OutlineOverlay.from_ct(ct.crop_to_labels([label], margin_mm=15.0), args.vertebra)  # as the node draws it
    pictures = [node_pictures[i] if i in node_pictures else frame_picture(seq, i, status[i], outline, published.get(i)) for i in range(n)]
    title = (f"simulated {args.vertebra} {args.view}, {args.trajectory} motion, {physics['physics'].split(' (')[0]} physics, "
             f"through the node\n{len(answered)} of {n} frames answered ({len(wrong)} wrong: mRPD > {WRONG_MRPD_MM:g} mm), "
             f"{status.count(REFUSED)} refused, {sum(status.count(s) for s in NOT_PROCESSED)} not processed")

    def plot(path=None, width=540, height=PANEL_PX):
        return error_plot(path, n, answered, err_mrpd, hold_mrpd, status, WRONG_MRPD_MM, title, (width, height))

    plot_rgb, x_to_px, rows = plot(out / "error_per_frame.png")
    errors = {int(i): float(e) for i, e in zip(answered, err_mrpd)}
    n_anim = write_gif(out / "animation.gif", animation_frames(pictures, plot_rgb, x_to_px, rows, status, errors, WRONG_MRPD_MM),
                       ANIMATION_FPS)
    overview_picture(out / "overview.png", pictures, status, lambda w: plot(None, w, 340)[0])

    counts = {"frames": n, "answered": len(answered), "wrong": int(len(wrong)), "refused": status.count(REFUSED),
              "dropped": status.count(DROPPED), "not_received": status.count(NOT_RECEIVED), "no_answer": status.count(NO_ANSWER)}
    summary = {
        "simulated": True,
        "vertebra": args.vertebra,
        "view": args.view,
        "trajectory": args.trajectory,
        "frames_replayed": n,
        **counts,
        "wrong_means": f"published with mRPD > {WRONG_MRPD_MM} mm",
        "status_per_frame": status,
        "poses_published": len(poses),
        "tf_messages": n_tf,
        "overlays_received": len(overlays),
        "frames_dropped_newest_wins": dropped_total,
        "node_state_at_end": diag.get("state"),
        "node_latency_ms_median": float(diag["latency_ms_median"]) if diag.get("latency_ms_median") else None,
        "replay": replay,
        "initialisation": ("SCR-PnP (models: " + str(params["models_dir"]) + "), refined by PPC") if args.init == "scr"
        else "ground truth of frame 0 on /registration/initial_pose",
        "physics": physics,
        "first_answered_frame": int(answered.min()),
        "mrpd_mm": {"median": float(np.median(err_mrpd)), "p95": float(np.percentile(err_mrpd, 95)), "max": float(err_mrpd.max())},
        "mtre_mm": {"median": float(np.median(err_mtre)), "max": float(err_mtre.max())},
        "mrpd_if_held_mm": {"median": float(np.median(hold_mrpd[1:])) if n > 1 else 0.0, "max": float(hold_mrpd.max())},
        "animation": {"file": "animation.gif", "frames": n_anim, "fps": ANIMATION_FPS},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lat = summary["node_latency_ms_median"]
    step.note(f"{len(poses)} poses for {n} frames: {counts['answered']} answered ({counts['wrong']} wrong: mRPD > {WRONG_MRPD_MM:g} mm), "
              f"{counts['refused']} refused (no pose), {counts['dropped']} dropped (newest frame wins), "
              f"{counts['not_received']} not received (lost on the way), {counts['no_answer']} unclear; "
              f"state at the end: {summary['node_state_at_end']}")
    if lat:
        step.note(f"node latency median {lat:.0f} ms per frame ({summary['replay']}): it keeps up with about {1000 / lat:.1f} frames/s "
                  f"on this machine (the sequence runs at 15)")
    step.note(f"error of the published poses: median mRPD {summary['mrpd_mm']['median']:.2f} mm (max {summary['mrpd_mm']['max']:.2f}); "
              f"holding the first pose would give median {summary['mrpd_if_held_mm']['median']:.2f} mm (simulated frames)")
    print(f"done in {summary['seconds']} s; animation.gif, overview.png, overlays/ (drawn by the node), error_per_frame.png, "
          f"summary.json, the bag and the node's log in:\n{out}", flush=True)
    return out


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "python -m reg2d3d_ros.demo")


if __name__ == "__main__":
    sys.exit(main())
