#!/bin/bash
# Make `apptainer` work on a Debian 12 host, which has no apptainer package.
#
# Debian sid's apptainer needs glibc >= 2.38, so it is installed into a
# debootstrapped trixie root, and a wrapper (default /usr/local/bin/apptainer)
# runs it there: `unshare --mount` + bind mounts of /proc, /sys, /dev and the
# host folders jobs use, then `pivot_root` (apptainer refuses a plain chroot).
# Host paths are bound at the same paths, so a task sees the same run folder,
# images and scratch inside and outside the wrapper.
#
# A cluster with a real apptainer needs none of this: when `apptainer` is
# already on PATH and is not ours, this script does nothing.
#
#   scripts/apptainer-host.sh            # as root; idempotent; about 1-2 minutes
#
# Settings (environment):
#   DCSLURM_APPTAINER_ROOT     the trixie root      (default /opt/dcslurm-apptainer/root)
#   DCSLURM_APPTAINER_WRAPPER  the wrapper to write (default /usr/local/bin/apptainer)
#   DEBIAN_MIRROR              (default http://deb.debian.org/debian)
set -euo pipefail

ROOT=${DCSLURM_APPTAINER_ROOT:-/opt/dcslurm-apptainer/root}
WRAPPER=${DCSLURM_APPTAINER_WRAPPER:-/usr/local/bin/apptainer}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MARK="# dcslurm apptainer-in-trixie wrapper"

existing=$(command -v apptainer || true)
if [ -n "$existing" ] && ! grep -q "$MARK" "$existing" 2>/dev/null; then
    echo "apptainer already installed at $existing: nothing to do"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "scripts/apptainer-host.sh: run as root (it debootstraps a root filesystem)" >&2
    exit 2
fi

if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
fi

if [ ! -x "$ROOT/usr/bin/apptainer" ]; then
    tmp="$ROOT.partial"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase trixie "$tmp" "$MIRROR"
    # sid only for apptainer (and what it needs), pinned below trixie.
    echo "deb [check-valid-until=no] $MIRROR sid main" > "$tmp/etc/apt/sources.list.d/sid.list"
    printf 'Package: *\nPin: release n=sid\nPin-Priority: 100\n' > "$tmp/etc/apt/preferences.d/sid"
    cp /etc/resolv.conf "$tmp/etc/resolv.conf"
    in_root() { chroot "$tmp" env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
    in_root apt-get update -q
    # debootstrap: for `Bootstrap: debootstrap` definitions; uidmap: --fakeroot builds.
    in_root apt-get install -y -q --no-install-recommends ca-certificates debootstrap uidmap squashfs-tools
    in_root apt-get install -y -q --no-install-recommends -t sid apptainer
    in_root apt-get clean
    # --fakeroot builds as root map root's subordinate ids.
    for f in subuid subgid; do
        grep -q '^root:' "$tmp/etc/$f" 2>/dev/null || echo "root:100000:65536" >> "$tmp/etc/$f"
    done
    mv "$tmp" "$ROOT"
fi

cat > "$WRAPPER" <<EOF
#!/bin/bash
$MARK (written by dcslurm scripts/apptainer-host.sh)
# Runs Debian sid's apptainer inside $ROOT through unshare + pivot_root,
# with host folders bound at the same paths.
ROOT=$(printf %q "$ROOT")
EOF
cat >> "$WRAPPER" <<'EOF'
# Host folders visible inside at the same path (plus DCSLURM_APPTAINER_BINDS, colon-separated).
BINDS="/tmp:/work:/home:/root:/srv:/scratch:/var/tmp${DCSLURM_APPTAINER_BINDS:+:$DCSLURM_APPTAINER_BINDS}"
# Some VMs withhold CAP_SYS_RESOURCE (bit 24); apptainer must then not try to keep it.
capbnd=$(awk '/^CapBnd/ {print $2}' /proc/self/status)
if (( (16#$capbnd >> 24 & 1) == 0 )); then
    export APPTAINER_DROP_CAPS=${APPTAINER_DROP_CAPS:-CAP_SYS_RESOURCE}
    # ... and root cannot build definitions with %post without a user namespace.
    if [ "${1-}" = build ] && [ "$(id -u)" = 0 ]; then
        set -- build --fakeroot "${@:2}"
    fi
fi
exec unshare --mount --propagation private /bin/bash -c '
    set -e
    root=$1 cwd=$2 binds=$3; shift 3
    mount --bind "$root" "$root"
    mount --rbind /proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    for f in /etc/resolv.conf /etc/hosts; do touch "$root$f"; mount --bind "$f" "$root$f"; done
    mkdir -p "$root/etc/ssl/certs" && mount --bind /etc/ssl/certs "$root/etc/ssl/certs"
    IFS=: read -r -a dirs <<< "$binds"
    for d in "${dirs[@]}"; do
        [ -n "$d" ] && [ -d "$d" ] || continue
        mkdir -p "$root$d" && mount --rbind "$d" "$root$d"
    done
    cd "$root"
    mkdir -p .oldroot
    pivot_root . .oldroot
    umount -l /.oldroot
    cd "$cwd" 2>/dev/null || cd /
    exec /usr/bin/apptainer "$@"
' apptainer-wrapper "$ROOT" "$PWD" "$BINDS" "$@"
EOF
chmod 755 "$WRAPPER"
"$WRAPPER" --version
