"""A real two-node Ray cluster (ray.cluster_utils.Cluster): trials land on both nodes, storage
under a URI both nodes reach, both nodes shut down cleanly."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow.parquet as pq

from tests.conftest import make_image_folder

SCRIPT = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster
    from tuning.run import main

    data_root, storage = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_slot": 1}})
    worker = cluster.add_node(num_cpus=1, resources={"worker_slot": 1})
    cluster.wait_for_nodes()
    print("NODES", cluster.head_node.node_id, worker.node_id)
    try:
        main(["hymenoptera", "--smoke-test", "--samples", "4", "--epochs", "2", "--address", cluster.address,
              "--data-root", data_root, "--storage", storage])
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()
    print("SHUTDOWN", "clean" if not cluster.list_all_nodes() else "left nodes")
""")


def test_trials_land_on_both_nodes_and_the_whole_run_under_a_storage_uri(tmp_path):
    """--storage takes a URI (here file://, the same code path as s3:// or gs://): every node's
    trials, the results and the export land under it, and the report reads it from there."""
    import os

    make_image_folder(tmp_path / "data" / "hymenoptera_data", {"train": 8, "val": 6})
    uri = f"file://{tmp_path}/bucket/runs"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), uri],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    head, worker = out.stdout.split("NODES")[1].split()[:2]
    assert "SHUTDOWN clean" in out.stdout
    run_dir = tmp_path / "bucket" / "runs" / "hymenoptera"
    table = pq.read_table(run_dir / "results.parquet").to_pandas()
    table = table[table["trial_id"] != "probe"]  # the linear probe ran in the driver, on no node
    assert len(table) == 4
    assert set(table["node_id"]) == {head, worker}
    for name in ("run.json", "best/model.json", "best/model.pt"):
        assert (run_dir / name).is_file(), name
    assert len(list(run_dir.glob("trial_*/progress.csv"))) == 4
    report = subprocess.run([sys.executable, "-m", "tuning.report", f"{uri}/hymenoptera"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (run_dir / "val_acc_per_epoch.png").is_file()
