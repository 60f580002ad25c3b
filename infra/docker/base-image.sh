#!/usr/bin/env bash
# Build smelt's container base image locally from Debian packages (no image registry needed):
# a debootstrap'ed Debian bookworm (Python 3.11, the version the project locks) with g++ and the
# Python headers (torch.compile's inductor and smelt's int8 kernel compile C++ at run time), and uv
# (BentoML's generated Dockerfile installs the Bento's requirements with it). `docker import`s the
# rootfs as the tag given. smelt calls this through `smelt containerize` with a tag named by the hash
# of this file and UV_VERSION, so it runs once per machine.
#
#   usage: infra/docker/base-image.sh TAG        (root; needs debootstrap and a running dockerd)
#   env:   DEBIAN_MIRROR (default http://deb.debian.org/debian), UV_VERSION (default 0.13.9)
set -euo pipefail
tag="${1:?usage: base-image.sh TAG}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
uv_version="${UV_VERSION:-0.13.9}"
packages="python3,python3-venv,python3-dev,g++,ca-certificates,curl"
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 2; }
rootfs="$(mktemp -d /tmp/smelt-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "base image: debootstrap bookworm ($packages) from $mirror" >&2
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >&2
# Commands in the rootfs get a clean environment: nothing of the host's pip or proxy settings leaks in.
in_root() { chroot "$rootfs" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"  # for pip inside the chroot; replaced by docker at run time
# The host's own CAs (a proxy's or a company's, in Debian's local CA folder) are trusted in the image as
# on the host: PyPI is reached through them here, at base-image time and when the Bento installs.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  in_root update-ca-certificates >&2
fi
in_root python3 -m venv /opt/uv
in_root /opt/uv/bin/pip install --quiet --no-cache-dir "uv==$uv_version"
ln -s /opt/uv/bin/uv "$rootfs/usr/local/bin/uv"
# apt lists and caches are not needed at run time; keep the image small.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs/etc/resolv.conf"
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --message "smelt base: Debian bookworm minbase + $packages + uv $uv_version" - "$tag" >&2
docker image inspect --format '{{.Size}}' "$tag"
