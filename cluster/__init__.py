"""How a Ray cluster is brought up for this project: configuration and a local launcher, not library code.

    python -m cluster.local_cluster up --workers 2      # head + 2 worker nodes on this machine, token auth on
    python -m cluster.local_cluster down                # stops only what `up` started (by pid)
    kubectl apply -f cluster/kuberay/rayjob.yaml        # KubeRay (see cluster/README.md)
    ray up cluster/aws/cluster.yaml                     # AWS VMs via the Ray cluster launcher

Two modules are imported by other code: cluster.local (LocalCluster, the one client of a local multi-node
cluster: the CLI above, tests/cluster and the train benchmark use it) and cluster.loopback (free_port and a
moto S3 server on 127.0.0.1, for the tests and the benchmarks). orchestrator.benchmark and tests/ import them;
of the library code only orchestrator.train.launch imports one function (free_port, for a local Ray
instance's dashboard port); model/ and pipelines/ never import cluster.
It writes its state and token files with pipelines.storage.atomic_write (the one atomic write). See cluster/README.md.
"""
