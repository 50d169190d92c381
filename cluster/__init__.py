"""How a Ray cluster is brought up for this project: configuration, not library code.

    python -m cluster.local_cluster up --workers 2      # head + 2 worker nodes on this machine, token auth on
    python -m cluster.local_cluster down                # stops only what `up` started (by pid)
    kubectl apply -f cluster/kuberay/rayjob.yaml        # KubeRay (see cluster/README.md)
    ray up cluster/aws/cluster.yaml                     # AWS VMs via the Ray cluster launcher

Nothing in model/, pipelines/ or orchestrator/ imports this package. See cluster/README.md.
"""
