"""A real two-node Ray cluster (ray.cluster_utils.Cluster) whose nodes share no cache: each node's
processes have a cache root of their own (TUNING_CACHE_DIR through the node's environment), the
run goes to S3 (a moto server, tests/s3.py). Trials land on both nodes; the worker node receives
the decoded store through Ray's object store and never decodes an image; it builds its own frozen
features; the configurations are a one-node run's on the same seed; the driver leaves the cluster
when its search ends; both nodes shut down cleanly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd

from tests.conftest import make_image_folder
from tuning.app.location import join

SAMPLES, SEED = 4, 5
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from ray.cluster_utils import Cluster
    import trainables.finetune as product
    from tuning.run import main

    data_root, storage, head_cache, worker_cache, marks = sys.argv[1:6]

    def recorded(config, **kwargs):
        # in the trial's process: which node, which cache root; decoding an image there fails the trial
        import ray
        import tuning.lib.data.decoded_store as store

        def never(*args, **kw):
            raise AssertionError("a trial decoded images")

        store.decode_listing = never
        context = ray.get_runtime_context()
        line = {"node": context.get_node_id(), "cache": os.environ.get("TUNING_CACHE_DIR"),
                "trial": ray.tune.get_context().get_trial_id()}
        with open(Path(marks) / f"{line['trial']}-{os.getpid()}.json", "w") as f:
            json.dump(line, f)
        return product.finetune(config, **kwargs)

    os.environ["TUNING_CACHE_DIR"] = head_cache  # the head's raylet, its workers and the driver
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1, env_vars={"TUNING_CACHE_DIR": worker_cache})
    cluster.wait_for_nodes()
    print("NODES", cluster.head_node.node_id, worker.node_id)
    try:
        main(["hymenoptera", "--smoke-test", "--samples", "%d", "--epochs", "2", "--seed", "%d",
              "--address", cluster.address, "--data-root", data_root, "--storage", storage], trainable=recorded)
        import ray
        print("LEFT", not ray.is_initialized())  # the search left the cluster it joined before returning
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()
    print("SHUTDOWN", "clean" if not cluster.list_all_nodes() else "left nodes")
""" % (SAMPLES, SEED))


def hparams(table: pd.DataFrame) -> list[dict]:
    trials = table[table["trial_id"] != "probe"]  # the linear probe ran in the driver, on no node
    cols = sorted(c for c in trials.columns if c.startswith("hp_"))
    return sorted((json.dumps({c: trials.loc[i, c] for c in cols}, default=str, sort_keys=True), trials.loc[i, "best_val_acc"])
                  for i in trials.index)


def test_two_nodes_without_a_shared_cache_run_the_one_node_search_into_s3(s3, cli, tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data" / "hymenoptera_data", {"train": 8, "val": 6}).parent
    head_cache, worker_cache, marks = tmp_path / "head-cache", tmp_path / "worker-cache", tmp_path / "marks"
    marks.mkdir()
    storage = s3.storage(prefix="cluster")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(data), storage, str(head_cache), str(worker_cache), str(marks)],
                         capture_output=True, text=True, timeout=600, env=s3.env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"trials: {SAMPLES}, errored: 0" in out.stdout, out.stdout[-2000:]  # no trial decoded an image
    head, worker = out.stdout.split("NODES")[1].split()[:2]
    assert "SHUTDOWN clean" in out.stdout and "LEFT True" in out.stdout

    # every node's trials, the results and the export are in the bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.writer["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.writer["AWS_SECRET_ACCESS_KEY"])
    table = pd.read_parquet(join(storage, "hymenoptera", "results.parquet"))
    ran = table[table["trial_id"] != "probe"]
    assert len(ran) == SAMPLES
    assert set(ran["node_id"]) == {head, worker}
    keys = s3.keys("cluster/hymenoptera/")
    assert len({k.split("/")[2] for k in keys if "/trial_" in k and k.endswith("/progress.csv")}) == SAMPLES
    assert "cluster/hymenoptera/best/model.pt" in keys

    # each node used its own cache root; the worker's store is the head's, received, not decoded
    lines = [json.loads(p.read_text()) for p in marks.glob("*.json")]
    assert {(m["node"], m["cache"]) for m in lines} == {(head, str(head_cache)), (worker, str(worker_cache))}
    head_store, worker_store = sorted((head_cache / "store").glob("*.arrow")), sorted((worker_cache / "store").glob("*.arrow"))
    assert len(worker_store) == 1 and [p.name for p in head_store] == [p.name for p in worker_store]
    assert worker_store[0].read_bytes() == head_store[0].read_bytes()
    assert any((worker_cache / "features").rglob("*")), "the worker node built no frozen features of its own"
    assert not (worker_cache / "runs").exists()  # the driver's mirror is on the head only

    # the same search on one node (this session's two-CPU Ray, local storage): the same trials
    one = cli("tuning.run", "hymenoptera", "--smoke-test", "--samples", str(SAMPLES), "--epochs", "2",
              "--seed", str(SEED), "--data-root", str(data), "--storage", str(tmp_path / "one-node"))
    assert one.returncode == 0, one.stderr[-2000:]
    single = hparams(pd.read_parquet(tmp_path / "one-node" / "hymenoptera" / "results.parquet"))
    double = hparams(table)
    assert [c for c, _ in double] == [c for c, _ in single]
    for (config, a), (_, b) in zip(double, single):
        assert abs(a - b) <= 1 / 12 + 1e-9, (config, a, b)  # within one of the 12 validation images


def test_ray_address_in_the_environment_is_the_cluster_to_join(ray_session):
    """`$RAY_ADDRESS` (set by `ray job submit`) counts as --address, as in any Ray script: the
    command joins this session's Ray. A bare ray.init() joined it too, then refused our Ray
    settings with a traceback."""
    import ray

    session = ray.get_runtime_context().gcs_address
    code = ("import ray\n"
            "from tuning.app.search import start_ray\n"
            "print('joined:', start_ray(), ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": session})
    assert f"joined: True {session}" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
