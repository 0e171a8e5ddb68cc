"""Pod and container from ``/proc/<pid>/cgroup``: the layouts of real nodes, non-pod processes, garbage."""

from __future__ import annotations

from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.agent.attestors.k8s_cgroup import PodContainer, container_of_cgroup, container_of_path

UID: Final = "2c48913c-b29f-11e7-9350-020968147796"
UID_: Final = UID.replace("-", "_")
STATIC_UID: Final = "5f3e4b8a9c1d2e7f6a0b1c2d3e4f5a6b"
CID: Final = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
OTHER_UID: Final = "9a0e7c31-44f2-4b8d-a6e5-1c2d3e4f5a6b"
OTHER_CID: Final = "87eba76e7f3164534045ba922e7770fb58bbd14ad732bbf5ba6f11cc56989e6e"
NODE_CID: Final = "4f0c1d7e2b9a8c3d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
EXPECTED: Final = PodContainer(pod_uid=UID, container_id=CID)

V1_CONTROLLERS: Final = (
    "12:hugetlb",
    "11:memory",
    "10:cpu,cpuacct",
    "9:pids",
    "8:blkio",
    "7:net_cls,net_prio",
    "6:freezer",
    "5:perf_event",
    "4:devices",
    "3:cpuset",
    "2:rdma",
    "1:name=systemd",
)


def v1(path: str, *, unified: str | None = None) -> bytes:
    """A cgroup v1 file: every controller's line with ``path`` (and a hybrid system's ``0::`` line)."""
    lines = [f"{controller}:{path}" for controller in V1_CONTROLLERS]
    if unified is not None:
        lines.append(f"0::{unified}")
    return ("\n".join(lines) + "\n").encode()


def v2(path: str) -> bytes:
    return f"0::{path}\n".encode()


SYSTEMD_POD: Final = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"


@pytest.mark.parametrize(
    "data",
    [
        # cgroup v1, cgroupfs driver (Docker through dockershim, containerd): Burstable, BestEffort, Guaranteed.
        pytest.param(v1(f"/kubepods/burstable/pod{UID}/{CID}"), id="v1-cgroupfs-burstable"),
        pytest.param(v1(f"/kubepods/besteffort/pod{UID}/{CID}"), id="v1-cgroupfs-besteffort"),
        pytest.param(v1(f"/kubepods/pod{UID}/{CID}"), id="v1-cgroupfs-guaranteed"),
        # cgroup v1, systemd driver: Docker, containerd, CRI-O; hybrid systems add a 0:: line.
        pytest.param(v1(f"{SYSTEMD_POD}/docker-{CID}.scope"), id="v1-systemd-docker"),
        pytest.param(v1(f"{SYSTEMD_POD}/cri-containerd-{CID}.scope", unified="/"), id="v1-systemd-containerd-hybrid"),
        pytest.param(v1(f"{SYSTEMD_POD}/crio-{CID}.scope"), id="v1-systemd-crio"),
        # CRI-O on cgroupfs names the container's cgroup crio-<id>.
        pytest.param(v1(f"/kubepods/besteffort/pod{UID}/crio-{CID}"), id="v1-cgroupfs-crio"),
        # containerd's "slice:prefix:name" form, seen on the name=systemd hierarchy.
        pytest.param(
            (
                f"4:devices:{SYSTEMD_POD}/cri-containerd-{CID}.scope\n"
                f"1:name=systemd:/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice"
                f":cri-containerd:{CID}\n"
            ).encode(),
            id="v1-containerd-slice-prefix-name",
        ),
        # cgroup v2.
        pytest.param(v2(f"{SYSTEMD_POD}/cri-containerd-{CID}.scope"), id="v2-systemd-containerd"),
        pytest.param(v2(f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"), id="v2-guaranteed"),
        pytest.param(
            v2(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"),
            id="v2-systemd-crio",
        ),
        pytest.param(v2(f"/kubepods/burstable/pod{UID}/{CID}"), id="v2-cgroupfs"),
        # A private cgroup namespace: paths relative to the reader's root.
        pytest.param(v2(f"/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"), id="v2-cgroupns"),
        pytest.param(v2(f"/../../../besteffort/pod{UID}/{CID}"), id="v2-cgroupns-cgroupfs"),
        # kind: the kubelet runs in a container, with the cgroup root /kubelet.
        pytest.param(
            v2(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
                f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            id="kind-v2",
        ),
        pytest.param(v1(f"/docker/{NODE_CID}/kubepods/besteffort/pod{UID}/{CID}"), id="kind-v1-nested-docker"),
        # A container that made cgroups of its own: the deeper segments are ignored...
        pytest.param(v2(f"/kubepods/besteffort/pod{UID}/{CID}/init"), id="sub-cgroup"),
        pytest.param(v2(f"{SYSTEMD_POD}/cri-containerd-{CID}.scope/system.slice/app.service"), id="sub-cgroup-systemd"),
        # ... even one that names another pod: only the first pod segment counts.
        pytest.param(
            v2(f"/kubepods/besteffort/pod{UID}/{CID}/kubepods/besteffort/pod{OTHER_UID}/{OTHER_CID}"),
            id="deeper-pod-ignored",
        ),
        pytest.param(b"0::/kubepods/besteffort/pod" + UID.encode() + b"/" + CID.encode(), id="no-final-newline"),
    ],
)
def test_pod_containers_of_real_layouts(data: bytes) -> None:
    assert container_of_cgroup(data) == EXPECTED


def test_a_static_pod_has_a_uid_without_dashes() -> None:
    pod = f"kubepods-burstable-pod{STATIC_UID}.slice"
    path = f"/kubepods.slice/kubepods-burstable.slice/{pod}/cri-containerd-{CID}.scope"
    assert container_of_cgroup(v2(path)) == PodContainer(pod_uid=STATIC_UID, container_id=CID)
    assert container_of_cgroup(v1(f"/kubepods/burstable/pod{STATIC_UID}/{CID}")) == PodContainer(
        pod_uid=STATIC_UID, container_id=CID
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(v2("/user.slice/user-1000.slice/session-3.scope"), id="login-session"),
        pytest.param(v2("/system.slice/containerd.service"), id="containerd-itself"),
        pytest.param(v2(f"/system.slice/docker-{CID}.scope"), id="plain-docker-container"),
        pytest.param(v2("/"), id="root"),
        pytest.param(v1("/system.slice/ssh.service", unified="/system.slice/ssh.service"), id="v1-host-service"),
        pytest.param(v1("/"), id="v1-root"),
        # The pod's own cgroup, not a container's.
        pytest.param(v2(f"/kubepods/besteffort/pod{UID}"), id="pod-level"),
        pytest.param(v2(SYSTEMD_POD), id="pod-slice"),
        # CRI-O's monitor process, beside the container, is not the container.
        pytest.param(v2(f"{SYSTEMD_POD}/crio-conmon-{CID}.scope"), id="crio-conmon"),
        pytest.param(v2(f"/kubepods/besteffort/pod{UID}/not-a-container"), id="not-a-container"),
        pytest.param(v2(f"/kubepods/besteffort/pod{UID}/{CID[:63]}"), id="short-container-id"),
        pytest.param(v2(f"/kubepods/besteffort/pod{UID}/{CID}0"), id="long-container-id"),
        pytest.param(v2(f"/kubepods/besteffort/pod{UID.upper()}/{CID}"), id="upper-case-uid"),
        pytest.param(v2(f"/kubepods/besteffort/pod{UID_}/{CID}"), id="cgroupfs-with-underscores"),
        pytest.param(
            v2(f"/kubepods.slice/kubepods-besteffort-pod{UID}.slice/cri-containerd-{CID}.scope"), id="slice-dashes"
        ),
        pytest.param(v2(f"/kubepods/besteffort/pod{UID}/unknownruntime-{CID}.scope"), id="unknown-runtime"),
        pytest.param(v2(f"/kubepods/besteffort/pod{UID[:-1]}/{CID}"), id="short-uid"),
        # The first pod segment decides, and here it names no container: a deeper one does not count.
        pytest.param(v2(f"/kubepods/besteffort/pod{UID}/x/pod{OTHER_UID}/{OTHER_CID}"), id="first-pod-decides"),
    ],
)
def test_processes_in_no_container_of_a_pod(data: bytes) -> None:
    assert container_of_cgroup(data) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no cgroup lines"),
        (b"\n\n", "no cgroup lines"),
        (b"hello\n", 'line 1 is not <hierarchy id>:<controllers>:<path>: "hello"'),
        (b"0:/kubepods\n", 'line 1 is not <hierarchy id>:<controllers>:<path>: "0:/kubepods"'),
        (b"x::/\n", 'line 1 is not <hierarchy id>:<controllers>:<path>: "x::/"'),
        (b"\xd9\xa1::/\n", 'line 1 is not <hierarchy id>:<controllers>:<path>: "\\u0661::/"'),  # an Arabic-Indic one
        (b"0::/\n0::kubepods\n", "line 2 has a path that does not start with '/': \"0::kubepods\""),
        (b"0::\n", "line 1 has a path that does not start with '/': \"0::\""),
        (
            f"4:devices:/kubepods/besteffort/pod{UID}/{CID}\n0::/kubepods/besteffort/pod{OTHER_UID}/{OTHER_CID}\n".encode(),
            f"line 2 names container {OTHER_CID} of pod {OTHER_UID}, an earlier line container {CID} of pod {UID}",
        ),
    ],
)
def test_malformed_files_are_refused_with_the_line(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=r".*") as raised:
        container_of_cgroup(data)
    assert str(raised.value) == message


def test_a_long_line_is_quoted_cut_short() -> None:
    with pytest.raises(ValueError, match=r"^line 1 is not .*\.\.\. \(5000 characters\)$"):
        container_of_cgroup(b"x" * 5000)


def test_non_utf8_paths_name_no_pod() -> None:
    assert container_of_cgroup(b"0::/kubepods/besteffort/\xff\xfe/" + CID.encode() + b"\n") is None


@pytest.mark.parametrize(
    ("uid", "container_id"),
    [(UID_, CID), (UID, CID.upper()), (UID, CID[:10]), ("", CID), (UID, "")],
)
def test_pod_container_values_are_validated(uid: str, container_id: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        PodContainer(pod_uid=uid, container_id=container_id)


# --- no crash on anything ------------------------------------------------------------------------

_SEGMENTS: Final = st.sampled_from(
    [
        "kubepods",
        "kubepods.slice",
        "burstable",
        "kubepods-burstable.slice",
        f"pod{UID}",
        f"kubepods-burstable-pod{UID_}.slice",
        f"kubepods-pod{UID_}.slice:cri-containerd:{CID}",
        CID,
        f"cri-containerd-{CID}.scope",
        f"crio-{CID}",
        f"docker-{CID}.scope",
        "..",
        "",
        "init",
    ]
)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        result = container_of_cgroup(data)
    except ValueError:
        return
    assert result is None or isinstance(result, PodContainer)


@given(
    st.lists(
        st.one_of(_SEGMENTS, st.text(st.characters(codec="utf-8", exclude_characters="\n/"), max_size=20)),
        max_size=10,
    )
)
def test_paths_of_plausible_segments_never_crash(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    result = container_of_path(path)
    assert container_of_cgroup(f"0::{path}".encode()) == result
    if result is not None:
        assert result == EXPECTED
