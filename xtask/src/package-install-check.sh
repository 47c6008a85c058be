#!/bin/sh
# Installs the .deb into a throwaway copy of this machine and checks what dpkg did.
# Run by `cargo xtask package` inside `unshare --mount`: the copy is an overlay of /
# whose writes go to a tmpfs, so neither the machine nor its dpkg database changes,
# and everything disappears with the mount namespace.
#
# usage: package-install-check.sh DEB SCRATCH_DIR
set -eu
deb=$1
scratch=$2

mount --make-rprivate /
mount -t tmpfs -o size=512m tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root=$scratch/root
mount -t proc proc "$root/proc"
in_root() { chroot "$root" "$@"; }
fail() { echo "install check: $*" >&2; exit 1; }
check() { echo "  ok: $*"; }

unit=/usr/lib/systemd/system/portwatch.service
wants=/etc/systemd/system/multi-user.target.wants/portwatch.service

# A portwatch the machine already has would hide what this package does.
if in_root dpkg-query -W -f='${Status}' portwatch 2>/dev/null | grep -q installed; then
	in_root dpkg --purge portwatch >/dev/null
fi

cp "$deb" "$root/tmp/portwatch.deb"
in_root dpkg -i /tmp/portwatch.deb
in_root dpkg-query -W -f='${Status}\n' portwatch | grep -qx 'install ok installed' ||
	fail "dpkg does not list portwatch as installed"
check "dpkg -i: install ok installed"

for f in /usr/sbin/portwatch "$unit" /etc/default/portwatch /etc/logrotate.d/portwatch \
	/usr/share/man/man8/portwatch.8.gz /usr/share/man/man8/portwatch-watch.8.gz \
	/usr/share/bash-completion/completions/portwatch \
	/usr/share/zsh/vendor-completions/_portwatch \
	/usr/share/fish/vendor_completions.d/portwatch.fish \
	/usr/share/doc/portwatch/copyright /usr/share/doc/portwatch/changelog.Debian.gz \
	/usr/share/doc/portwatch/examples/vector.toml; do
	[ -e "$root$f" ] || fail "$f is missing after dpkg -i"
done
check "files in place"

# postinst: deb-systemd-helper enabled the unit (systemd is not running in a chroot,
# so nothing is started; on a real host postinst runs deb-systemd-invoke start).
# deb-systemd-helper names the unit by /lib/systemd/system first: the same file on a
# merged-/usr system, so compare where the link ends up.
[ -L "$root$wants" ] && [ "$(in_root readlink -f "$wants")" = "$(in_root readlink -f "$unit")" ] ||
	fail "$wants is not a link to $unit"
check "enabled: $wants -> $(readlink "$root$wants")"

in_root dpkg-query -W -f='${Conffiles}\n' portwatch | grep -q /etc/default/portwatch ||
	fail "/etc/default/portwatch is not a conffile"
check "conffiles registered"

in_root /usr/sbin/portwatch --version
# verify exits 0 on unknown or misspelt settings, only warning: any output fails.
out=$(in_root systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify $unit: $out"
[ -z "$out" ] || fail "systemd-analyze verify $unit: $out"
check "systemd-analyze verify: silent (installed unit, binary and man pages resolved)"
in_root systemd-analyze security --offline=true --no-pager "$unit" | tail -n 1

for page in portwatch portwatch-watch portwatch-snapshot portwatch-rules portwatch-rules-check; do
	warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 in_root man --warnings -E UTF-8 -Tutf8 -Z 8 "$page" 2>&1 >/dev/null)
	[ -z "$warnings" ] || fail "man $page: $warnings"
done
check "man pages render without groff warnings"
in_root bash -n /usr/share/bash-completion/completions/portwatch || fail "bash completion syntax"
check "bash completion parses"

in_root dpkg --purge portwatch
for f in /usr/sbin/portwatch "$unit" "$wants" /etc/default/portwatch /var/log/portwatch; do
	[ ! -e "$root$f" ] && [ ! -L "$root$f" ] || fail "$f is still there after dpkg --purge"
done
check "dpkg --purge removed the files, the enable link and the log directory"
