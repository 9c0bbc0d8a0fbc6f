"""Write and read simulated sequences as rosbag2 bags (mcap or sqlite3) with ``rosbags``.

Topics (the interface contract, ``../shared/INTERFACE.md``):

- ``/carm/image`` (``sensor_msgs/Image``), ``/carm/camera_info`` (``sensor_msgs/CameraInfo``),
  same stamp and ``frame_id`` per frame;
- ``/carm/ground_truth_pose`` (``geometry_msgs/PoseStamped``): ``T_optical_from_ct`` in metres,
  header copied from the image.

A ``ground_truth.json`` is written inside the bag folder with the same poses (metres and mm),
the intrinsics and the simulation parameters. Nothing here imports rclpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, Reg2D3DError
from ..geometry.camera import CArmIntrinsics
from ..geometry.se3 import pose_m_to_transform, transform_to_pose_m
from ..images import decode_image, encode_image
from .sequence import SimulatedSequence

IMAGE_TOPIC = "/carm/image"
INFO_TOPIC = "/carm/camera_info"
GT_TOPIC = "/carm/ground_truth_pose"
GT_JSON = "ground_truth.json"


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _header(ts, stamp_ns: int, frame_id: str):
    Time = ts.types["builtin_interfaces/msg/Time"]
    Header = ts.types["std_msgs/msg/Header"]
    return Header(stamp=Time(sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9)), frame_id=frame_id)


def sequence_messages(seq: SimulatedSequence, ts=None):
    """Yield ``(topic, msgtype, stamp_ns, message)`` for every frame in time order (rosbags types)."""
    ts = ts or _typestore()
    Image = ts.types["sensor_msgs/msg/Image"]
    CameraInfo = ts.types["sensor_msgs/msg/CameraInfo"]
    ROI = ts.types["sensor_msgs/msg/RegionOfInterest"]
    PoseStamped = ts.types["geometry_msgs/msg/PoseStamped"]
    Pose = ts.types["geometry_msgs/msg/Pose"]
    Point = ts.types["geometry_msgs/msg/Point"]
    Quaternion = ts.types["geometry_msgs/msg/Quaternion"]
    ci = seq.intrinsics.to_camera_info()
    pos, quat = transform_to_pose_m(torch.from_numpy(seq.poses_mm))
    for f in range(len(seq)):
        stamp = int(seq.stamps_ns[f])
        hdr = _header(ts, stamp, seq.frame_id)
        fields = encode_image(seq.images[f], seq.encoding)
        img = Image(
            header=hdr,
            height=fields["height"],
            width=fields["width"],
            encoding=fields["encoding"],
            is_bigendian=0,
            step=fields["step"],
            data=np.frombuffer(fields["data"], dtype=np.uint8),
        )
        info = CameraInfo(
            header=hdr,
            height=ci["height"],
            width=ci["width"],
            distortion_model=ci["distortion_model"],
            d=np.array(ci["d"], dtype=np.float64),
            k=np.array(ci["k"], dtype=np.float64),
            r=np.array(ci["r"], dtype=np.float64),
            p=np.array(ci["p"], dtype=np.float64),
            binning_x=0,
            binning_y=0,
            roi=ROI(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
        )
        p, q = pos[f].tolist(), quat[f].tolist()
        gt = PoseStamped(
            header=hdr,
            pose=Pose(position=Point(x=p[0], y=p[1], z=p[2]), orientation=Quaternion(x=q[0], y=q[1], z=q[2], w=q[3])),
        )
        yield INFO_TOPIC, CameraInfo.__msgtype__, stamp, info
        yield IMAGE_TOPIC, Image.__msgtype__, stamp, img
        yield GT_TOPIC, PoseStamped.__msgtype__, stamp, gt


def write_sequence_bag(seq: SimulatedSequence, path, storage: str = "mcap", overwrite: bool = False) -> Path:
    """Write a sequence as a rosbag2 folder ``path`` (plus ``path/ground_truth.json``).

    Parameters
    ----------
    seq : SimulatedSequence
        The sequence.
    path : str or Path
        Bag folder to create.
    storage : str
        ``mcap`` or ``sqlite3``.
    overwrite : bool
        Replace an existing folder.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = Path(path)
    plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
    if storage not in plugins:
        raise ConfigError(f"storage must be one of {sorted(plugins)}, got {storage!r}")
    if path.exists():
        if not overwrite:
            raise ConfigError(f"bag folder {path} already exists (pass overwrite to replace it)")
        import shutil

        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = _typestore()
    with Writer(path, version=9, storage_plugin=plugins[storage]) as writer:
        conns = {}
        for topic, msgtype, stamp, msg in sequence_messages(seq, ts):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(conns[topic], stamp, ts.serialize_cdr(msg, msgtype))
    write_ground_truth_json(seq, path / GT_JSON)
    return path


def write_ground_truth_json(seq: SimulatedSequence, path) -> None:
    """Ground truth of a sequence as JSON (poses in metres + quaternions, and mm matrices)."""
    pos, quat = transform_to_pose_m(torch.from_numpy(seq.poses_mm))
    doc = {
        "frame_id": seq.frame_id,
        "ct_frame": "ct",
        "pose": "T_optical_from_ct",
        "encoding": seq.encoding,
        "intensity": seq.intensity,
        "camera_info": seq.intrinsics.to_camera_info(),
        "pixel_spacing_mm": seq.intrinsics.pixel_spacing_mm,
        "frames": [
            {
                "index": f,
                "stamp_ns": int(seq.stamps_ns[f]),
                "position_m": pos[f].tolist(),
                "orientation_xyzw": quat[f].tolist(),
                "T_optical_from_ct_mm": seq.poses_mm[f].tolist(),
            }
            for f in range(len(seq))
        ],
        "simulation": seq.meta,
    }
    Path(path).write_text(json.dumps(doc, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def read_sequence_bag(path) -> SimulatedSequence:
    """Read a bag written by :func:`write_sequence_bag` (or any bag with the same topics).

    Ground-truth poses come from ``/carm/ground_truth_pose`` when present (else NaN).
    """
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise Reg2D3DError(f"bag {path} does not exist")
    ts = _typestore()
    images, stamps, encoding, frame_id, info, gts = [], [], None, "carm_optical", None, {}
    try:
        with Reader(path) as reader:
            for conn, _t, raw in reader.messages():
                msg = ts.deserialize_cdr(raw, conn.msgtype)
                if conn.topic == IMAGE_TOPIC:
                    stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                    images.append(decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data, msg.is_bigendian))
                    stamps.append(stamp)
                    encoding, frame_id = msg.encoding, msg.header.frame_id
                elif conn.topic == INFO_TOPIC and info is None:
                    info = CArmIntrinsics.from_camera_info(msg.k, msg.width, msg.height)
                elif conn.topic == GT_TOPIC:
                    stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                    p, q = msg.pose.position, msg.pose.orientation
                    gts[stamp] = pose_m_to_transform(
                        torch.tensor([p.x, p.y, p.z], dtype=torch.float64), torch.tensor([q.x, q.y, q.z, q.w], dtype=torch.float64)
                    ).numpy()
    except Reg2D3DError:
        raise
    except Exception as exc:  # rosbags raises its own error types for corrupt bags
        raise Reg2D3DError(f"cannot read bag {path}: {exc}") from None
    if not images:
        raise Reg2D3DError(f"bag {path} has no {IMAGE_TOPIC} messages")
    if info is None:
        raise Reg2D3DError(f"bag {path} has no {INFO_TOPIC} messages")
    json_path = path / GT_JSON
    meta, intensity = {}, "attenuation"
    if json_path.is_file():
        doc = json.loads(json_path.read_text())
        meta, intensity = doc.get("simulation", {}), doc.get("intensity", intensity)
        if doc.get("pixel_spacing_mm"):
            info = CArmIntrinsics.from_camera_info(info.to_camera_info()["k"], info.width, info.height, doc["pixel_spacing_mm"])
    poses = np.stack([gts.get(s, np.full((4, 4), np.nan)) for s in stamps])
    dtype = {"mono8": np.uint8, "mono16": np.uint16, "32FC1": np.float32}[encoding]
    return SimulatedSequence(
        images=np.stack(images).astype(dtype),
        encoding=encoding,
        intensity=intensity,
        poses_mm=poses,
        intrinsics=info,
        stamps_ns=np.asarray(stamps, dtype=np.int64),
        frame_id=frame_id,
        meta=meta,
    )
