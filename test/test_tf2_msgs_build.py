"""Checks of the tf2_msgs package built by scripts/build_tf2_msgs.sh (or the system's tf2_msgs).

Runs in the project's environment (``sys.executable``): the message imports, round-trips through
rclpy's serialization, is byte- and hash-compatible with the upstream definition (as known to
``rosbags``' ROS 2 Kilted typestore), and travels between two processes over Fast DDS, with the
default transports and with ``FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA``.
"""

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

TOPIC = '/reg2d3d_test/tf'

# One transform with distinctive values (exactly representable as float64).
STAMP = (1_700_000_123, 456_789_012)
PARENT = 'carm_optical'
CHILD = 'ct'
TRANSLATION = (0.125, -0.5, 1.75)
ROTATION = (0.5, -0.5, 0.5, 0.5)  # x, y, z, w (unit quaternion)


def make_rclpy_message():
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage

    t = TransformStamped()
    t.header.stamp.sec, t.header.stamp.nanosec = STAMP
    t.header.frame_id = PARENT
    t.child_frame_id = CHILD
    t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = TRANSLATION
    r = t.transform.rotation
    r.x, r.y, r.z, r.w = ROTATION
    return TFMessage(transforms=[t])


def transform_values(t):
    """The fields of one TransformStamped (rclpy or rosbags object) as plain tuples."""
    tr, rot = t.transform.translation, t.transform.rotation
    return (
        (t.header.stamp.sec, t.header.stamp.nanosec),
        t.header.frame_id,
        t.child_frame_id,
        (tr.x, tr.y, tr.z),
        (rot.x, rot.y, rot.z, rot.w),
    )


EXPECTED_VALUES = (STAMP, PARENT, CHILD, TRANSLATION, ROTATION)


@pytest.fixture(scope='module')
def kilted_store():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def make_rosbags_message(store):
    T = store.types
    t = T['geometry_msgs/msg/TransformStamped'](
        header=T['std_msgs/msg/Header'](
            stamp=T['builtin_interfaces/msg/Time'](sec=STAMP[0], nanosec=STAMP[1]),
            frame_id=PARENT),
        child_frame_id=CHILD,
        transform=T['geometry_msgs/msg/Transform'](
            translation=T['geometry_msgs/msg/Vector3'](*TRANSLATION),
            rotation=T['geometry_msgs/msg/Quaternion'](*ROTATION)),
    )
    return T['tf2_msgs/msg/TFMessage'](transforms=[t])


def installed_type_hashes(type_name):
    """RIHS01 hashes recorded by rosidl in the installed share/tf2_msgs/msg/<Type>.json.

    The install prefix is the one the imported tf2_msgs comes from
    (<prefix>/lib/pythonX.Y/site-packages/tf2_msgs): the venv built by scripts/build_tf2_msgs.sh,
    or e.g. /opt/ros/<distro> on a full ROS 2 install.
    """
    import pathlib

    import tf2_msgs

    prefix = pathlib.Path(tf2_msgs.__file__).resolve().parents[4]
    path = prefix / 'share' / 'tf2_msgs' / 'msg' / (type_name + '.json')
    assert path.is_file(), f'{path} not found (tf2_msgs imported from {tf2_msgs.__file__})'
    data = json.loads(path.read_text(encoding='utf-8'))
    return {h['type_name']: h['hash_string'] for h in data['type_hashes']}


# ---- in-process checks ------------------------------------------------------------------------

def test_import_and_type_support():
    import tf2_msgs.msg
    from tf2_msgs.msg import TF2Error, TFMessage

    assert TFMessage.get_fields_and_field_types() == {
        'transforms': 'sequence<geometry_msgs/TransformStamped>'}
    assert TF2Error.get_fields_and_field_types() == {'error': 'uint8', 'error_string': 'string'}
    assert (TF2Error.NO_ERROR, TF2Error.LOOKUP_ERROR, TF2Error.TRANSFORM_ERROR) == (0, 1, 6)
    type(TFMessage).__import_type_support__()
    assert TFMessage._TYPE_SUPPORT is not None
    assert tf2_msgs.msg.TFMessage is TFMessage


def test_serialization_round_trip():
    from rclpy.serialization import deserialize_message, serialize_message
    from tf2_msgs.msg import TFMessage

    msg = make_rclpy_message()
    data = serialize_message(msg)
    assert isinstance(data, bytes) and len(data) > 60
    back = deserialize_message(data, TFMessage)
    assert len(back.transforms) == 1
    assert transform_values(back.transforms[0]) == EXPECTED_VALUES
    assert back == msg

    empty = deserialize_message(serialize_message(TFMessage()), TFMessage)
    assert list(empty.transforms) == []


def test_cdr_bytes_match_rosbags(kilted_store):
    from rclpy.serialization import deserialize_message, serialize_message
    from tf2_msgs.msg import TFMessage

    ours = serialize_message(make_rclpy_message())
    theirs = bytes(kilted_store.serialize_cdr(
        make_rosbags_message(kilted_store), 'tf2_msgs/msg/TFMessage'))
    # Same layout byte for byte, except CDR alignment padding: Fast-CDR leaves padding bytes
    # unwritten (whatever was in the buffer), rosbags writes zeros. A differing byte must lie in
    # a run of zeros (in rosbags' bytes) that ends on an alignment boundary of the CDR body.
    assert len(ours) == len(theirs)
    assert ours[:4] == theirs[:4]  # encapsulation header
    for i in (k for k in range(len(ours)) if ours[k] != theirs[k]):
        assert theirs[i] == 0, f'byte {i} differs and is not padding'
        end = i
        while end < len(theirs) and theirs[end] == 0 and (end - 4) % 8 != 0:
            end += 1
        assert (end - 4) % 4 == 0 and end - i < 8, f'byte {i} differs outside alignment padding'
    # rosbags re-serialises what rclpy wrote to exactly its own bytes
    canonical = bytes(kilted_store.serialize_cdr(
        kilted_store.deserialize_cdr(ours, 'tf2_msgs/msg/TFMessage'), 'tf2_msgs/msg/TFMessage'))
    assert canonical == theirs

    # and each side reads the other's bytes
    from_rosbags = deserialize_message(theirs, TFMessage)
    assert transform_values(from_rosbags.transforms[0]) == EXPECTED_VALUES
    from_rclpy = kilted_store.deserialize_cdr(ours, 'tf2_msgs/msg/TFMessage')
    assert transform_values(from_rclpy.transforms[0]) == EXPECTED_VALUES


def test_message_definitions_match_rosbags(kilted_store):
    from tf2_msgs.msg import TF2Error

    consts, fields = kilted_store.fielddefs['tf2_msgs/msg/TF2Error']
    assert [(name, value) for name, _, value in consts] == [
        (name, getattr(TF2Error, name)) for name, _, _ in consts]
    assert [name for name, _ in fields] == list(TF2Error.get_fields_and_field_types())
    _, tf_fields = kilted_store.fielddefs['tf2_msgs/msg/TFMessage']
    assert [name for name, _ in tf_fields] == ['transforms']


@pytest.mark.parametrize('type_name', ['TFMessage', 'TF2Error'])
def test_recorded_type_hash_matches_rosbags(kilted_store, type_name):
    full_name = 'tf2_msgs/msg/' + type_name
    expected = kilted_store.hash_rihs01(full_name)
    assert expected.startswith('RIHS01_')
    hashes = installed_type_hashes(type_name)
    assert hashes[full_name] == expected
    if type_name == 'TFMessage':  # the referenced types are recorded too
        for ref in ('geometry_msgs/msg/TransformStamped', 'std_msgs/msg/Header'):
            assert hashes[ref] == kilted_store.hash_rihs01(ref)


def test_runtime_type_hash_matches_rosbags(kilted_store, tmp_path, monkeypatch):
    """The hash that rmw announces for a TFMessage publisher (from the C type support)."""
    import rclpy
    from rclpy.context import Context
    from tf2_msgs.msg import TFMessage

    monkeypatch.setenv('ROS_LOG_DIR', str(tmp_path))
    ctx = Context()
    rclpy.init(context=ctx, domain_id=random_domain_id())
    try:
        node = rclpy.create_node('tf2_msgs_hash_check', context=ctx)
        node.create_publisher(TFMessage, TOPIC, 1)
        infos = node.get_publishers_info_by_topic(TOPIC)
        assert len(infos) == 1
        assert infos[0].topic_type == 'tf2_msgs/msg/TFMessage'
        assert str(infos[0].topic_type_hash) == kilted_store.hash_rihs01('tf2_msgs/msg/TFMessage')
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


# ---- across processes -------------------------------------------------------------------------

PUBLISHER = textwrap.dedent('''
    import sys, time
    import rclpy
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage

    topic, timeout = sys.argv[1], float(sys.argv[2])
    stamp, parent, child, translation, rotation = {values!r}
    rclpy.init()
    node = rclpy.create_node('tf2_msgs_test_publisher')
    pub = node.create_publisher(TFMessage, topic, 10)
    t = TransformStamped()
    t.header.stamp.sec, t.header.stamp.nanosec = stamp
    t.header.frame_id, t.child_frame_id = parent, child
    v, q = t.transform.translation, t.transform.rotation
    v.x, v.y, v.z = translation
    q.x, q.y, q.z, q.w = rotation
    msg = TFMessage(transforms=[t])
    deadline = time.monotonic() + timeout
    while pub.get_subscription_count() < 1:  # messages sent before a match are lost
        if time.monotonic() > deadline:
            print('publisher: no subscriber matched', flush=True)
            sys.exit(2)
        time.sleep(0.01)
    sent = 0
    # keep sending until the subscriber has left (it exits after the first message)
    while pub.get_subscription_count() > 0 and time.monotonic() < deadline:
        pub.publish(msg)
        sent += 1
        time.sleep(0.05)
    print('publisher: sent', sent, flush=True)
    node.destroy_node()
    rclpy.shutdown()
''').format(values=EXPECTED_VALUES)

SUBSCRIBER = textwrap.dedent('''
    import json, sys, time
    import rclpy
    from tf2_msgs.msg import TFMessage

    topic, timeout = sys.argv[1], float(sys.argv[2])
    rclpy.init()
    node = rclpy.create_node('tf2_msgs_test_subscriber')
    got = []
    node.create_subscription(TFMessage, topic, got.append, 10)
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    pubs = node.get_publishers_info_by_topic(topic)
    out = {'received': len(got), 'publisher_hashes': [str(p.topic_type_hash) for p in pubs],
           'publisher_types': [p.topic_type for p in pubs]}
    if got:
        t = got[0].transforms[0]
        tr, rot = t.transform.translation, t.transform.rotation
        out.update(n_transforms=len(got[0].transforms),
                   values=[[t.header.stamp.sec, t.header.stamp.nanosec], t.header.frame_id,
                           t.child_frame_id, [tr.x, tr.y, tr.z], [rot.x, rot.y, rot.z, rot.w]])
    print('RESULT ' + json.dumps(out), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    sys.exit(0 if got else 3)
''')


def random_domain_id():
    # 1..101: higher domains put Fast DDS's ports in Linux's ephemeral port range
    return random.randint(1, 101)


def run_pair(tmp_path, transports, timeout=20.0):
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(random_domain_id())
    env['ROS_LOG_DIR'] = str(tmp_path / 'ros_log')
    env.pop('ROS_LOCALHOST_ONLY', None)
    env.pop('ROS_AUTOMATIC_DISCOVERY_RANGE', None)
    if transports is None:
        env.pop('FASTDDS_BUILTIN_TRANSPORTS', None)
    else:
        env['FASTDDS_BUILTIN_TRANSPORTS'] = transports
    args = [TOPIC, str(timeout)]
    sub = subprocess.Popen([sys.executable, '-c', SUBSCRIBER, *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pub = subprocess.Popen([sys.executable, '-c', PUBLISHER, *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sub_out, _ = sub.communicate(timeout=timeout + 15)
        pub_out, _ = pub.communicate(timeout=10)
    finally:
        for p in (sub, pub):
            if p.poll() is None:
                p.kill()
                p.wait()
    return sub.returncode, sub_out, pub.returncode, pub_out


@pytest.mark.parametrize('transports', [None, 'LARGE_DATA'], ids=['default', 'large_data'])
def test_publish_subscribe_across_processes(kilted_store, tmp_path, transports):
    start = time.monotonic()
    sub_rc, sub_out, pub_rc, pub_out = run_pair(tmp_path, transports)
    elapsed = time.monotonic() - start
    assert sub_rc == 0, f'subscriber failed ({sub_rc}):\n{sub_out}\npublisher:\n{pub_out}'
    assert pub_rc == 0, f'publisher failed ({pub_rc}):\n{pub_out}'
    result_lines = [ln for ln in sub_out.splitlines() if ln.startswith('RESULT ')]
    assert len(result_lines) == 1, sub_out
    result = json.loads(result_lines[0][len('RESULT '):])
    assert result['received'] == 1
    assert result['n_transforms'] == 1
    stamp, parent, child, translation, rotation = result['values']
    assert (tuple(stamp), parent, child, tuple(translation), tuple(rotation)) == EXPECTED_VALUES
    # the publisher, as discovered by the other process, announces the upstream type and hash
    assert result['publisher_types'] == ['tf2_msgs/msg/TFMessage']
    assert result['publisher_hashes'] == [kilted_store.hash_rihs01('tf2_msgs/msg/TFMessage')]
    assert elapsed < 30
