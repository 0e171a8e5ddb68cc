"""The kubelet's pod list (recorded ``/pods`` answers in fixtures/) and the ``k8s`` selectors of its containers."""

from __future__ import annotations

import json
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.agent.attestors.k8s_pods import (
    ContainerStatus,
    Pod,
    PodList,
    PodListError,
    container_id,
    parse_pod_list,
    pod_list,
)
from tests.sidecar.agent.kubelet import FIXTURES, fixture

API: Final = "14c2529eb4498c5d1ffd6915d05bf58a91bdda796af59f41d480d11c099d0479"
ENVOY: Final = "84532b306f259587c364bd7301e0813963d5b84fd27c9338f0862dab8f0499d7"
MIGRATE: Final = "3bc801a33ea83df414e1aeb962a52412835be99db28668ec25de73fdd4733804"
DEBUGGER: Final = "4c44d7c28ec0f6ca3e2624c6af1d3be324576d01ef6f6c2dc0af7e61664b8c2c"
WORKER: Final = "87eba76e7f3164534045ba922e7770fb58bbd14ad732bbf5ba6f11cc56989e6e"
ETCD: Final = "c38cbd92fce41312f3fbdce60510013b7f0d4004a03b45c8e762f98f1ed4006c"
FRONTEND: Final = "1cf387c012cd2d02f1923e589f86df4a4802427057dbc90f47b87f04d29d54bc"
LEGACY: Final = "a172cedcae47474b615c54d510a5d84a8dea3032e958587430b413538be3f333"

API_IMAGE_ID: Final = "ghcr.io/example/api@sha256:a171bb2f321200f5c1d35bedcdebe695af9516f1908be12b34eb2e90c6834228"
ENVOY_IMAGE_ID: Final = (
    "docker.io/envoyproxy/envoy@sha256:cd8a8dfa3572743b0bfaac9d17715cbca734398d46d7c6b4c0da3be5a2656d52"
)
MIGRATE_IMAGE_ID: Final = (
    "ghcr.io/example/api-migrate@sha256:6cee6d4a9a5a3a7c83daf2cee728e8051bf31afad0a07f9962efde951e44269d"
)
BUSYBOX_IMAGE_ID: Final = (
    "docker.io/library/busybox@sha256:03fd02cef3b9d7792fc9d41fbda778267837672faeebc79202642fc1d27ea599"
)

# What every container of the api pod shares.
API_POD: Final = frozenset(
    {
        "k8s:ns:payments",
        "k8s:sa:api",
        "k8s:node-name:node-1",
        "k8s:pod-name:api-7c9d8f6b5-x2k4p",
        "k8s:pod-uid:3f1c9a52-6b0e-4d7a-9c41-2e8b5f6d7a10",
        "k8s:pod-label:app:api",
        "k8s:pod-label:app.kubernetes.io/part-of:shop",
        "k8s:pod-label:pod-template-hash:7c9d8f6b5",
        "k8s:pod-owner:ReplicaSet:api-7c9d8f6b5",
        "k8s:pod-owner-uid:ReplicaSet:b7e2d1c4-0a9f-4e3b-8d6c-5f4a3b2c1d0e",
        "k8s:pod-image:ghcr.io/example/api:1.4.2",
        f"k8s:pod-image:{API_IMAGE_ID}",
        "k8s:pod-image:docker.io/envoyproxy/envoy:v1.30.1",
        f"k8s:pod-image:{ENVOY_IMAGE_ID}",
        "k8s:pod-image-count:2",
        "k8s:pod-init-image:ghcr.io/example/api-migrate:1.4.2",
        f"k8s:pod-init-image:{MIGRATE_IMAGE_ID}",
        "k8s:pod-init-image-count:1",
    }
)


def selectors_of(pods: PodList, container: str) -> frozenset[str]:
    found = pods.find(container)
    assert found is not None, f"container {container} is not in the list"
    pod, status = found
    return pod.selectors(status)


@pytest.fixture(scope="module")
def containerd() -> PodList:
    return parse_pod_list((FIXTURES / "kubelet-pods-containerd.json").read_bytes())


def test_a_containerd_nodes_list(containerd: PodList) -> None:
    assert [pod.name for pod in containerd.pods] == [
        "api-7c9d8f6b5-x2k4p",
        "batch-28453920-6wq9z",
        "etcd-node-1",
        "web-5b7f9c6d4-mh2rt",
    ]
    assert containerd.skipped == ()
    assert containerd.node_names == {"node-1"}
    # The web pod's container is still being created: it has no ID yet, so it cannot be found.
    assert set(containerd.by_container) == {API, ENVOY, MIGRATE, DEBUGGER, WORKER, ETCD}


def test_selectors_of_a_deployments_container(containerd: PodList) -> None:
    assert selectors_of(containerd, API) == API_POD | {
        "k8s:container-name:api",
        "k8s:container-image:ghcr.io/example/api:1.4.2",
        f"k8s:container-image:{API_IMAGE_ID}",
    }


def test_a_sidecar_shares_its_pods_selectors_and_has_its_own_container_ones(containerd: PodList) -> None:
    assert selectors_of(containerd, ENVOY) == API_POD | {
        "k8s:container-name:envoy",
        "k8s:container-image:docker.io/envoyproxy/envoy:v1.30.1",
        f"k8s:container-image:{ENVOY_IMAGE_ID}",
    }


def test_init_and_ephemeral_containers_are_found(containerd: PodList) -> None:
    assert selectors_of(containerd, MIGRATE) == API_POD | {
        "k8s:container-name:migrate",
        "k8s:container-image:ghcr.io/example/api-migrate:1.4.2",
        f"k8s:container-image:{MIGRATE_IMAGE_ID}",
    }
    debugger = selectors_of(containerd, DEBUGGER)
    assert debugger - API_POD == {
        "k8s:container-name:debugger-7kq2z",
        "k8s:container-image:docker.io/library/busybox:1.36",
        f"k8s:container-image:{BUSYBOX_IMAGE_ID}",
    }
    # An ephemeral container is no image of the pod's.
    assert not any("busybox" in selector for selector in debugger & API_POD)


def test_a_static_pod_has_no_service_account_and_no_owner(containerd: PodList) -> None:
    selectors = selectors_of(containerd, ETCD)
    assert "k8s:pod-uid:5f3e4b8a9c1d2e7f6a0b1c2d3e4f5a6b" in selectors
    assert "k8s:ns:kube-system" in selectors
    assert not any(s.startswith(("k8s:sa:", "k8s:pod-owner")) for s in selectors)
    assert {"k8s:pod-label:component:etcd", "k8s:pod-label:tier:control-plane"} <= selectors


def test_a_jobs_pod(containerd: PodList) -> None:
    selectors = selectors_of(containerd, WORKER)
    assert {
        "k8s:sa:batch",
        "k8s:pod-owner:Job:batch-28453920",
        "k8s:pod-owner-uid:Job:5c6d7e8f-9a0b-4c1d-8e2f-3a4b5c6d7e8f",
        "k8s:pod-label:batch.kubernetes.io/job-name:batch-28453920",
        "k8s:pod-init-image-count:0",
        "k8s:pod-image-count:1",
    } <= selectors
    assert not any(s.startswith("k8s:pod-init-image:") for s in selectors)


@pytest.mark.parametrize(
    ("name", "container", "expected"),
    [
        (
            "crio",
            FRONTEND,
            {
                "k8s:ns:shop",
                "k8s:sa:frontend",
                "k8s:node-name:worker-a",
                "k8s:container-name:frontend",
                "k8s:container-image:quay.io/example/frontend:3.1",
                "k8s:pod-owner:ReplicaSet:frontend-6d5c4b3a2",
            },
        ),
        (
            "docker",
            LEGACY,
            {
                "k8s:ns:legacy",
                "k8s:sa:default",
                "k8s:pod-name:legacy-0",
                "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796",
                "k8s:pod-owner:StatefulSet:legacy",
                "k8s:pod-label:statefulset.kubernetes.io/pod-name:legacy-0",
                "k8s:container-image:registry.example.com/legacy/app:7",
            },
        ),
    ],
)
def test_cri_o_and_docker_nodes(name: str, container: str, expected: set[str]) -> None:
    pods = pod_list(fixture(name))
    assert expected <= selectors_of(pods, container)
    assert pods.skipped == ()


def test_docker_image_ids_keep_their_scheme_as_spire_does() -> None:
    selectors = selectors_of(pod_list(fixture("docker")), LEGACY)
    ids = [s for s in selectors if s.startswith("k8s:container-image:docker-pullable://")]
    assert len(ids) == 1


def test_a_node_without_pods_answers_items_null() -> None:
    pods = parse_pod_list((FIXTURES / "kubelet-pods-empty.json").read_bytes())
    assert pods.pods == ()
    assert pods.find(API) is None
    assert pods.node_names == frozenset()


def test_pods_omit_fields_they_do_not_need() -> None:
    minimal = Pod(uid="u", name="n", namespace="ns")
    metadata = {"uid": "u", "name": "n", "namespace": "ns"}
    assert pod_list({"items": [{"metadata": metadata}]}).pods == (minimal,)
    # Go writes a nil map or slice as null.
    nulls = {"metadata": metadata | {"labels": None, "ownerReferences": None}, "spec": None, "status": None}
    assert pod_list({"items": [nulls]}).pods == (minimal,)
    no_statuses = {"metadata": metadata, "status": {"containerStatuses": None, "initContainerStatuses": None}}
    assert pod_list({"items": [no_statuses]}).pods == (minimal,)


def test_service_account_falls_back_to_the_deprecated_field() -> None:
    document = fixture("containerd")
    del document["items"][0]["spec"]["serviceAccountName"]
    assert "k8s:sa:api" in selectors_of(pod_list(document), API)


def test_empty_image_ids_give_no_selector() -> None:
    document = fixture("containerd")
    document["items"][0]["status"]["containerStatuses"][0]["imageID"] = ""
    selectors = selectors_of(pod_list(document), API)
    assert not any(s.endswith(":") for s in selectors)
    assert f"k8s:container-image:{API_IMAGE_ID}" not in selectors
    assert "k8s:container-image:ghcr.io/example/api:1.4.2" in selectors


def test_label_values_may_hold_colons_and_be_empty() -> None:
    document = fixture("containerd")
    document["items"][0]["metadata"]["labels"] = {"example.com/endpoint": "tcp://db:5432", "empty": ""}
    selectors = selectors_of(pod_list(document), API)
    assert {"k8s:pod-label:example.com/endpoint:tcp://db:5432", "k8s:pod-label:empty:"} <= selectors


# --- malformed answers and pods ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the answer is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"<html>502 Bad Gateway</html>", "the answer is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b'{"items": [', "the answer is not JSON: Expecting value: line 1 column 12 (char 11)"),
        (
            b"\xff\xfe\x00",
            "the answer is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "the answer is not JSON: nested too deeply"),
        (b"[]", "the answer is not a PodList: a JSON array, not an object"),
        (b"null", "the answer is not a PodList: a JSON null, not an object"),
        (b'{"kind": "Status", "status": "Failure"}', 'the answer is not a PodList: its kind is "Status"'),
        (b'{"kind": 7}', 'the answer is not a PodList: its kind is "7"'),
        (b'{"items": {}}', "the answer is not a PodList: items is a JSON object, not an array"),
        (b'{"items": "pods"}', "the answer is not a PodList: items is a JSON string, not an array"),
    ],
)
def test_answers_that_are_no_pod_list(data: bytes, message: str) -> None:
    with pytest.raises(PodListError) as raised:
        parse_pod_list(data)
    assert str(raised.value) == message


def _broken(change: str) -> dict[str, Any]:
    """The batch pod, then the api pod broken as ``change`` says."""
    batch, pod = fixture("containerd")["items"][1], fixture("containerd")["items"][0]
    if change == "not-an-object":
        pod = 7
    elif change == "no-metadata":
        del pod["metadata"]
    elif change == "no-uid":
        del pod["metadata"]["uid"]
    elif change == "empty-name":
        pod["metadata"]["name"] = ""
    elif change == "labels-list":
        pod["metadata"]["labels"] = ["app=api"]
    elif change == "label-number":
        pod["metadata"]["labels"]["replicas"] = 3
    elif change == "owners-object":
        pod["metadata"]["ownerReferences"] = {"kind": "ReplicaSet"}
    elif change == "owner-without-uid":
        del pod["metadata"]["ownerReferences"][0]["uid"]
    elif change == "statuses-object":
        pod["status"]["containerStatuses"] = {}
    elif change == "status-without-name":
        del pod["status"]["containerStatuses"][1]["name"]
    elif change == "container-id-without-scheme":
        pod["status"]["containerStatuses"][1]["containerID"] = ENVOY
    elif change == "sa-number":
        pod["spec"]["serviceAccountName"] = 1
    return {"items": [batch, pod]}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("not-an-object", "pod 1: the pod is a JSON number, not an object"),
        ("no-metadata", "pod 1: metadata is a JSON null, not an object"),
        ("no-uid", "pod 1: metadata has no uid"),
        ("empty-name", "pod 1: name of metadata is empty"),
        ("labels-list", 'pod 1: metadata.labels of pod "api-7c9d8f6b5-x2k4p" is a JSON array, not an object'),
        ("label-number", 'pod 1: label "replicas" of pod "api-7c9d8f6b5-x2k4p" is a JSON number, not a string'),
        (
            "owners-object",
            'pod 1: metadata.ownerReferences of pod "api-7c9d8f6b5-x2k4p" is a JSON object, not an array',
        ),
        ("owner-without-uid", 'pod 1: an owner reference of pod "api-7c9d8f6b5-x2k4p" has no uid'),
        (
            "statuses-object",
            'pod 1: status.containerStatuses of pod "api-7c9d8f6b5-x2k4p" is a JSON object, not an array',
        ),
        ("status-without-name", 'pod 1: status.containerStatuses of pod "api-7c9d8f6b5-x2k4p" has no name'),
        ("container-id-without-scheme", f'pod 1: containerID "{ENVOY}" is not <runtime>://<id>'),
        ("sa-number", 'pod 1: serviceAccountName of spec of pod "api-7c9d8f6b5-x2k4p" is a JSON number, not a string'),
    ],
)
def test_a_malformed_pod_is_left_out_and_named(change: str, reason: str) -> None:
    pods = pod_list(_broken(change))
    assert pods.skipped == (reason,)
    assert pods.find(API) is None  # the broken pod's containers are not found...
    assert pods.find(WORKER) is not None  # ... and the others' still are


def test_a_container_id_listed_twice_is_ambiguous_and_left_out() -> None:
    document = fixture("containerd")
    stolen = document["items"][1]["status"]["containerStatuses"][0]
    stolen["containerID"] = f"containerd://{API}"
    pods = pod_list(document)
    assert pods.find(API) is None
    assert pods.skipped == (f"container ID {API} is listed more than once",)
    assert pods.find(ENVOY) is not None


def test_three_claims_of_one_id_are_still_ambiguous() -> None:
    document = fixture("containerd")
    for index in (1, 2):
        document["items"][index]["status"]["containerStatuses"][0]["containerID"] = f"containerd://{API}"
    assert pod_list(document).find(API) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"containerd://{API}", API),
        (f"docker://{API}", API),
        (f"cri-o://{API}", API),
        ("containerd://abc", "abc"),
    ],
)
def test_container_ids_lose_their_scheme(value: str, expected: str) -> None:
    assert container_id(value) == expected


@pytest.mark.parametrize("value", [API, "containerd://", f"://{API}", "containerd:/" + API])
def test_container_ids_without_a_scheme_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="is not <runtime>://<id>"):
        container_id(value)


def test_selectors_of_a_minimal_pod() -> None:
    status = ContainerStatus(name="c", kind="container", container_id=API)
    pod = Pod(uid="u", name="n", namespace="ns", statuses=(status,))
    assert pod.selectors(status) == {
        "k8s:ns:ns",
        "k8s:pod-name:n",
        "k8s:pod-uid:u",
        "k8s:pod-image-count:1",
        "k8s:pod-init-image-count:0",
        "k8s:container-name:c",
    }


# --- no crash on anything ------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
_KEYS = st.sampled_from(
    ["metadata", "spec", "status", "uid", "name", "namespace", "labels", "ownerReferences", "kind", "containerStatuses",
     "initContainerStatuses", "containerID", "image", "imageID", "serviceAccountName", "nodeName", "items"]
)  # fmt: skip
_SHAPED = st.recursive(
    st.none() | st.text(max_size=10) | st.just(f"containerd://{API}") | st.integers(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=40,
)


@given(st.one_of(_JSON, _SHAPED))
def test_arbitrary_documents_never_crash(document: Any) -> None:
    try:
        pods = pod_list(document)
    except PodListError:
        return
    for pod, status in pods.by_container.values():
        assert all(selector.startswith("k8s:") for selector in pod.selectors(status))


@given(st.dictionaries(_KEYS, _SHAPED, max_size=6))
def test_arbitrary_pods_never_crash(pod: dict[str, Any]) -> None:
    pods = pod_list({"items": [pod]})
    assert len(pods.pods) + len(pods.skipped) >= 1


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    result: PodList | str
    try:
        result = parse_pod_list(data)
    except PodListError as err:
        result = str(err)
    assert isinstance(result, PodList) or result.startswith("the answer is not ")


def test_the_fixtures_are_what_the_kubelet_sends() -> None:
    # The recorded answers keep the kubelet's shape: a PodList whose items have the three parts.
    for path in sorted(FIXTURES.glob("kubelet-pods-*.json")):
        document = json.loads(path.read_text())
        assert document["kind"] == "PodList"
        assert document["apiVersion"] == "v1"
        for item in document["items"] or []:
            assert set(item) == {"metadata", "spec", "status"}, path.name
