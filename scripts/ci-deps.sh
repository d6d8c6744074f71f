#!/usr/bin/env bash
# Installs and starts what the tests need beyond Go, on a fresh Debian
# machine: Docker's engine (the docker provider), QEMU and Debian's cloud
# kernel (the qemu provider), busybox (the qemu image's tools), Node.js (the
# Node SDK and the Agones SDK tests). Safe to run again: what is there is kept.
set -euo pipefail

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v node >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "ci-deps: need root to install ${need[*]}" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# dockerd, when it is not running already.
if ! docker version >/dev/null 2>&1; then
	nohup dockerd >/tmp/dedi-ci-dockerd.log 2>&1 &
	for _ in $(seq 1 60); do
		docker version >/dev/null 2>&1 && break
		sleep 0.5
	done
	docker version >/dev/null 2>&1 || { echo "ci-deps: dockerd did not start:" >&2; tail -20 /tmp/dedi-ci-dockerd.log >&2; exit 1; }
fi
