#!/usr/bin/env bash
# The one-command demo (`make run`): rd-dummy, rd-server and rd-client on loopback, and a
# request through the tunnel. Set RD_DEMO_ONESHOT=1 to exit after the request (CI does);
# RD_DEMO_SERVER / RD_DEMO_DUMMY choose the listen addresses (default the Go example's
# ports on 127.0.0.1; 127.0.0.1:0 picks free ones).
set -euo pipefail

bin_dir=${RD_BIN_DIR:-target/release}
server_listen=${RD_DEMO_SERVER:-127.0.0.1:8123}
dummy_listen=${RD_DEMO_DUMMY:-127.0.0.1:8125}
for b in rd-server rd-client rd-dummy; do
    [[ -x "$bin_dir/$b" ]] || { echo "demo: $bin_dir/$b is missing; run 'make run' (it builds them)" >&2; exit 1; }
done
bin_dir=$(cd "$bin_dir" && pwd)

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "hello from the far side of an rd tunnel" > "$work/hello.txt"

# Starts a binary in the background and waits for its "listening on URL" line; sets $started_url.
# (Not called in a command substitution: that subshell would lose the pid, and the cleanup
# would leave the process running.)
start() {
    local name=$1; shift
    local out="$work/$name.out"
    "$@" > "$out" 2> "$work/$name.log" &
    pids+=("$!")
    for _ in $(seq 1 100); do
        if grep -q '^listening on ' "$out" 2>/dev/null; then
            started_url=$(sed -n 's/^listening on //p' "$out" | head -n 1)
            return 0
        fi
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "demo: $name did not start:" >&2
    cat "$work/$name.log" >&2
    return 1
}

start rd-dummy "$bin_dir/rd-dummy" -listen "$dummy_listen" -dir "$work"
dummy_url=$started_url
start rd-server "$bin_dir/rd-server" -listen "$server_listen"
server_url=$started_url
server_hostport=${server_url#http://}
dummy_hostport=${dummy_url#http://}
"$bin_dir/rd-client" -connect "ws://$server_hostport/connect" -id foo > /dev/null 2> "$work/rd-client.log" &
pids+=("$!")

url="http://$server_hostport/client/foo/http/$dummy_hostport/hello.txt"
# The client connects asynchronously; retry until its session is registered.
for _ in $(seq 1 100); do
    if body=$(curl -sf --max-time 5 "$url"); then
        break
    fi
    body=""
    sleep 0.1
done
if [[ -z "$body" ]]; then
    echo "demo: no answer through the tunnel from $url" >&2
    tail -n 20 "$work"/*.log >&2
    exit 1
fi

echo "rd-dummy   $dummy_url  (serving $work)"
echo "rd-server  $server_url"
echo "rd-client  connected as 'foo'"
echo
echo "GET $url"
echo "  -> $body"
echo
if [[ "${RD_DEMO_ONESHOT:-0}" == "1" ]]; then
    exit 0
fi
echo "Try it yourself:  curl $url"
echo "Logs are in $work/*.log. Press Ctrl-C to stop all three."
wait
