#!/bin/sh
# `cargo xtask package --boot`: this machine's userland booted with systemd as PID 1
# (systemd-nspawn on an overlay of /, writes to a tmpfs), where the .deb is installed
# with dpkg -i and the service it starts is checked for events, its sandbox, a clean
# stop and a clean purge. For machines (like this project's microVMs) whose PID 1 is
# not systemd. Run inside `unshare --mount`: nothing outlives the mount namespace.
#
# usage: package-boot-check.sh DEB SCRATCH_DIR
set -eu
deb=$1
scratch=$2

mount --make-rprivate /
mount -t tmpfs -o size=1g tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root=$scratch/root

cp "$deb" "$root/opt/portwatch.deb"
# Container images forbid service starts with policy-rc.d; a real host does not.
rm -f "$root/usr/sbin/policy-rc.d"
if chroot "$root" dpkg-query -W -f='${Status}' portwatch 2>/dev/null | grep -q installed; then
	chroot "$root" dpkg --purge portwatch >/dev/null
fi
echo 0123456789abcdef0123456789abcdef >"$root/etc/machine-id"

cat >"$root/opt/portwatch-boot-test" <<'TEST'
#!/bin/sh
# In the container, after boot: what an administrator does, checked.
exec >/opt/portwatch-boot-result 2>&1
fail() { echo "FAIL: $*"; journalctl -u portwatch --no-pager -o cat | tail -n 20; exit 1; }
ok() { echo "  ok: $*"; }
log=/var/log/portwatch/events.json
wait_for() { i=0; while [ $i -lt 100 ]; do grep -q "$1" $log 2>/dev/null && return 0; i=$((i + 1)); sleep 0.1; done; return 1; }

# The container's private network has only lo; a veth with a TEST-NET address gives a
# wildcard listener a public exposure, so the firewall verdict is worked out for it.
ip link add pw-v0 type veth peer name pw-v1 && ip addr add 198.51.100.9/24 dev pw-v0 &&
	ip link set pw-v0 up && ip link set pw-v1 up || fail "veth for the exposure check"

dpkg -i /opt/portwatch.deb >/dev/null || fail "dpkg -i"
[ "$(systemctl is-enabled portwatch)" = enabled ] || fail "not enabled by postinst"
systemctl start portwatch  # postinst started it already; a no-op then
wait_for sensor-started || fail "no sensor-started in $log"
[ "$(systemctl is-active portwatch)" = active ] || fail "not active"
ok "dpkg -i enabled and started portwatch.service; sensor-started in $log"
# Type=notify: only the agent's READY=1, sent after its self-check, carries this status.
[ "$(systemctl show -p Type --value portwatch)" = notify ] || fail "Type is not notify"
systemctl show -p StatusText --value portwatch | grep -q '^watching: self-check passed$' ||
	fail "no READY=1 status from the agent: $(systemctl show -p StatusText portwatch)"
[ "$(systemctl show -p WatchdogUSec --value portwatch)" = 30s ] || fail "no watchdog"
ok "Type=notify: ready after the self-check (status: watching: self-check passed), watchdog 30 s"

pid=$(systemctl show -p MainPID --value portwatch)
grep -q '^CapBnd:.*000000c000283004$' /proc/$pid/status || fail "capability bounding set: $(grep CapBnd /proc/$pid/status)"
grep -q '^NoNewPrivs:.*1$' /proc/$pid/status || fail "NoNewPrivs is not set"
[ "$(stat -c '%U:%G %a' $log)" = "root:adm 640" ] || fail "$log is $(stat -c '%U:%G %a' $log)"
ok "bounding set BPF PERFMON NET_ADMIN NET_RAW SYS_ADMIN SYS_PTRACE DAC_READ_SEARCH, NoNewPrivs, $log root:adm 0640"

python3 -c "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',47123)); s.listen(); time.sleep(0.3)"
setpriv --reuid=65534 --regid=65534 --clear-groups python3 -c \
	"import socket,time; u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0',47124)); time.sleep(0.3)"
wait_for '"action":"listen-stopped".*"port":47123' || fail "no listen-started/stopped for 127.0.0.1:47123"
wait_for '"action":"udp-released".*"port":47124' || fail "no udp-bound/released for 0.0.0.0:47124"
grep '"action":"udp-bound".*"port":47124' $log | grep -q '"user":{"id":"65534","name":"nobody"}' ||
	fail "udp-bound not attributed to nobody"
ok "a TCP listener and a UDP bind (as nobody) reported, start and end"
# The ruleset tools run under the unit's sandbox: an empty ruleset accepts.
grep '"action":"udp-bound".*"port":47124' $log | grep -q '"firewall":{"verdict":"accepted"' ||
	fail "no firewall verdict under the unit's sandbox: $(grep '"port":47124' $log | grep -o '"firewall":{[^}]*}' | head -1)"
ok "firewall verdict read under the unit's sandbox (accepted: no ruleset)"

systemctl stop portwatch
[ "$(systemctl show -p Result --value portwatch)" = success ] || fail "stop: $(systemctl show -p Result portwatch)"
[ "$(systemctl show -p ExecMainStatus --value portwatch)" = 0 ] || fail "exit status on SIGTERM is not 0"
ok "systemctl stop: exit status 0"

dpkg --purge portwatch >/dev/null || fail "dpkg --purge"
[ ! -e /var/log/portwatch ] && [ ! -L /etc/systemd/system/multi-user.target.wants/portwatch.service ] ||
	fail "purge left files behind"
ok "dpkg --purge removed the unit link and /var/log/portwatch"
echo PASS
TEST
chmod 755 "$root/opt/portwatch-boot-test"
cat >"$root/etc/systemd/system/portwatch-boot-test.service" <<'UNIT'
[Unit]
Description=portwatch package boot test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/opt/portwatch-boot-test
ExecStopPost=/bin/systemctl poweroff --no-block
[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/portwatch-boot-test.service \
	"$root/etc/systemd/system/multi-user.target.wants/portwatch-boot-test.service"

# Own network namespace, so the booted services cannot touch the host's interfaces;
# cgroup v2 inside, as on current distributions; bpf() and perf_event_open() are not in
# nspawn's default seccomp allow list.
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 timeout 180 systemd-nspawn --quiet --directory="$root" \
	--boot --register=no --keep-unit --private-network --capability=all \
	--system-call-filter="bpf perf_event_open" --bind-ro=/sys/kernel/btf \
	>"$scratch/console.log" 2>&1 || true
if [ ! -f "$root/opt/portwatch-boot-result" ]; then
	tail -n 30 "$scratch/console.log"
	echo "boot check: the container produced no result" >&2
	exit 1
fi
cat "$root/opt/portwatch-boot-result"
tail -n 1 "$root/opt/portwatch-boot-result" | grep -qx PASS
