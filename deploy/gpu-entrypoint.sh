#!/bin/sh
# Pin this container to one GPU, so `docker compose up --scale worker-gpu=N` runs one worker
# per GPU.
#
# Why: compose's `count: 1` GPU reservation always hands out device 0 (Docker maps a count to
# devices 0..count-1), so N scaled replicas would all train on GPU 0. Instead each replica
# reserves every GPU and claims the first free one with an exclusive flock on a file in a
# volume the replicas share. The lock lives as long as this process (the file descriptor is
# inherited across exec), so a replica that exits or is killed frees its GPU at once.
#
# Does nothing when CUDA_VISIBLE_DEVICES is already set, when LABCTL_GPUS gives this worker
# several GPUs (labctl worker --gpus sets CUDA_VISIBLE_DEVICES itself), when no lock folder
# is mounted (CPU workers, the CLI) or when no GPU is visible.
set -eu

lock_dir="${LABCTL_GPU_LOCK_DIR:-/var/lock/labctl-gpus}"
dev_dir="${LABCTL_GPU_DEV_DIR:-/dev}"  # overridable for tests only

if [ -z "${CUDA_VISIBLE_DEVICES:-}" ] && [ -z "${LABCTL_GPUS:-}" ] && [ -d "$lock_dir" ] && [ -w "$lock_dir" ]; then
    # /dev/nvidia0, /dev/nvidia1, ... : one node per GPU the container can see.
    count=$(find "$dev_dir" -maxdepth 1 -name 'nvidia[0-9]*' | grep -c '/nvidia[0-9]*$' || true)
    if [ "$count" -gt 0 ]; then
        i=0
        while [ "$i" -lt "$count" ]; do
            exec 9>"$lock_dir/gpu$i"
            if flock -n 9; then
                # PCI order, so index i means the same GPU to every replica.
                export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$i"
                echo "labctl: this worker uses GPU $i of $count" >&2
                break
            fi
            exec 9>&-
            i=$((i + 1))
        done
        if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
            echo "labctl: all $count GPUs are taken by other replicas; scale worker-gpu to" \
                 "at most $count" >&2
            exit 75  # EX_TEMPFAIL: compose restarts it, and it gets a GPU once one is free
        fi
    fi
fi

exec "$@"
