"""A real two-node Ray cluster (ray.cluster_utils.Cluster): trials land on both nodes, storage on
a shared local path, both nodes shut down cleanly."""
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


def test_trials_land_on_both_nodes(tmp_path):
    make_image_folder(tmp_path / "data" / "hymenoptera_data", {"train": 8, "val": 6})
    shared = tmp_path / "shared_storage"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(shared)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    head, worker = out.stdout.split("NODES")[1].split()[:2]
    assert "SHUTDOWN clean" in out.stdout
    table = pq.read_table(shared / "hymenoptera" / "results.parquet").to_pandas()
    assert len(table) == 4
    assert set(table["node_id"]) == {head, worker}
