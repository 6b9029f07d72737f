#!/usr/bin/env bash
# Image test (`make image-check`, part of `make test`): builds docs/deploy/Dockerfile's
# `prebuilt` target from static binaries built here (no registry is needed), then runs
# rd-server in the image with host networking on loopback, rd-dummy and rd-client on the
# host and a second rd-client in the image, and checks:
#   - the image holds the three binaries and nothing else, runs as 65532:65532, is small;
#   - tokens mounted as files (as from a Kubernetes Secret) are read by the non-root user
#     on a read-only root filesystem with no capabilities;
#   - a download through each client's tunnel is byte-exact, and host names resolve in the
#     scratch image (the in-image client reaches the server by a name from /etc/hosts);
#   - /healthz, /livez and /readyz answer 200;
#   - SIGTERM (docker stop) ends rd-server, PID 1 in the container, with status 0.
#
# Docker: uses the daemon `docker info` reaches; otherwise starts dockerd (Debian's
# docker.io package) with its state under a temporary directory and stops it afterwards.
# When neither works it prints why and exits 0 (skipped).
#
# Env: CARGO, MAKE (as make passes them); RD_IMAGE_TEST_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { echo "image-check: $*"; }
skip() {
    say "SKIPPED: $*"
    exit 0
}

work=$(mktemp -d /tmp/rd-image-test.XXXXXX)
pids=()
containers=()
image=""
dockerd_pid=""
cleanup() {
    local rc=$?
    set +e
    for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1; done
    [[ -n "$image" ]] && docker rmi -f "$image" >/dev/null 2>&1
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    # A bare `wait` (no pids yet) would wait for dockerd too, forever.
    (( ${#pids[@]} )) && wait "${pids[@]}" 2>/dev/null
    if [[ -n "$dockerd_pid" ]]; then
        kill "$dockerd_pid" 2>/dev/null
        # dockerd stops its containerd and unmounts its layers before it exits.
        for _ in $(seq 1 150); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
        # It leaves its network namespace's bind mount behind (and more if it was killed).
        grep -o " $work/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
    fi
    if [[ $rc -ne 0 ]]; then
        say "FAILED; logs:"
        for f in "$work"/*.log; do [[ -f "$f" ]] && { echo "--- $f"; tail -n 30 "$f"; }; done
    fi
    if [[ "${RD_IMAGE_TEST_KEEP:-0}" == "1" ]]; then
        say "work directory kept: $work"
    else
        rm -rf "$work" 2>/dev/null
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- a Docker daemon -------------------------------------------------------------------
command -v docker >/dev/null || skip "no docker client (apt-get install docker.io)"
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || skip "no Docker daemon reachable and no dockerd to start (apt-get install docker.io)"
    say "starting dockerd (state in $work/docker)"
    # No bridge and no iptables rules: the test uses host networking only and leaves the
    # machine's network as it found it.
    dockerd --data-root "$work/docker/data" --exec-root "$work/docker/exec" \
        --pidfile "$work/docker/dockerd.pid" -H "unix://$work/docker/docker.sock" \
        --iptables=false --bridge=none > "$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    export DOCKER_HOST="unix://$work/docker/docker.sock"
    up=""
    for _ in $(seq 1 300); do
        if docker info >/dev/null 2>&1; then up=1; break; fi
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z "$up" ]]; then
        reason=$(grep -m1 -iE 'failed|error' "$work/dockerd.log" || tail -n 1 "$work/dockerd.log")
        skip "dockerd did not start: $reason"
    fi
fi

# --- static binaries and the image ---------------------------------------------------------
say "building static binaries (make image-bins)"
${MAKE:-make} --no-print-directory image-bins > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
bins=target/$(rustc -vV | sed -n 's/^host: //p')/release
mkdir "$work/context"
cp "$bins/rd-server" "$bins/rd-client" "$bins/rd-dummy" "$work/context/"
image="rd-image-test:$$"
docker build -q -f docs/deploy/Dockerfile --target prebuilt -t "$image" "$work/context" > "$work/image-build.log" 2>&1 \
    || { cat "$work/image-build.log"; exit 1; }

user=$(docker image inspect -f '{{.Config.User}}' "$image")
[[ "$user" == "65532:65532" ]] || { say "image user is '$user', want 65532:65532"; exit 1; }
size=$(docker image inspect -f '{{.Size}}' "$image")
(( size < 40 * 1024 * 1024 )) || { say "image is $size bytes, want < 40 MiB"; exit 1; }
# What the image carries, less what Docker adds to every container (mount points, /etc/hosts,
# /etc/resolv.conf, /etc/hostname, /etc/mtab, /.dockerenv).
probe=$(docker create "$image")
containers+=("$probe")
docker export "$probe" | tar -t | sed 's,/$,,' \
    | grep -vxE '\.dockerenv|(dev|proc|sys)(/.*)?|etc|etc/(hosts|hostname|resolv\.conf|mtab)' \
    | sort > "$work/files"
printf '%s\n' usr usr/local usr/local/bin usr/local/bin/rd-client usr/local/bin/rd-dummy usr/local/bin/rd-server > "$work/want"
diff -u "$work/want" "$work/files" || { say "unexpected files in the image"; exit 1; }
say "image: $((size / 1024 / 1024)) MiB, user $user, only the three binaries"

# --- tokens, as a Kubernetes Secret would mount them ---------------------------------------
secrets="$work/secrets"
mkdir "$secrets"
foo_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
bar_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
admin_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf 'foo %s\nbar %s\n' "$foo_token" "$bar_token" > "$secrets/agent-tokens"
printf 'bearer %s\n' "$admin_token" > "$secrets/admin-auth"
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secrets/peer-token"
echo "$foo_token" > "$secrets/foo.token"
echo "$bar_token" > "$secrets/bar.token"
# World-readable as a Secret volume's default mode: the container's user is not the owner.
chmod 755 "$secrets" && chmod 644 "$secrets"/*

# Waits up to 30 s for a line matching $2 in file $1 while process $3 lives; prints it.
wait_line() {
    local file=$1 re=$2 pid=$3
    for _ in $(seq 1 300); do
        if grep -m1 -E "$re" "$file" 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || { grep -m1 -E "$re" "$file" 2>/dev/null && return 0; break; }
        sleep 0.1
    done
    say "no line matching '$re' in $(basename "$file")"
    return 1
}

# --- rd-dummy on the host --------------------------------------------------------------------
mkdir "$work/www"
head -c $((3 * 1024 * 1024 + 12345)) /dev/urandom > "$work/www/blob.bin"
"$bins/rd-dummy" -listen 127.0.0.1:0 -dir "$work/www" > "$work/dummy.out" 2> "$work/dummy.log" &
pids+=($!)
dummy=$(wait_line "$work/dummy.out" '^listening on ' "${pids[-1]}" | sed 's,^listening on http://,,')

# --- rd-server in the image ---------------------------------------------------------------
server="rd-image-test-server-$$"
containers+=("$server")
docker run --rm --name "$server" --network host \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    -v "$secrets:/etc/rd:ro" \
    -e RD_LISTEN=127.0.0.1:0 -e RD_ADMIN_LISTEN=127.0.0.1:0 -e RD_ID=image-test \
    -e RD_TOKEN_FILE=/etc/rd/peer-token -e RD_AGENT_TOKENS=/etc/rd/agent-tokens \
    -e RD_ADMIN_AUTH=/etc/rd/admin-auth \
    "$image" > "$work/server.out" 2> "$work/server.log" &
server_pid=$!
pids+=("$server_pid")
tunnel=$(wait_line "$work/server.out" '^listening on ' "$server_pid" | sed 's,^listening on http://,,')
admin=$(wait_line "$work/server.out" '^admin listening on ' "$server_pid" | sed 's,^admin listening on http://,,')
say "rd-server in the image: tunnel $tunnel, admin $admin"

# --- rd-client on the host, and one in the image that finds the server by name ---------------
"$bins/rd-client" -connect "ws://$tunnel/connect" -id foo --token-file "$secrets/foo.token" \
    --allow "tcp:$dummy" > /dev/null 2> "$work/client-host.log" &
pids+=($!)
client="rd-image-test-client-$$"
containers+=("$client")
docker run --rm --name "$client" --network host \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    --add-host "rd-server.image-test.invalid:127.0.0.1" \
    -v "$secrets/bar.token:/etc/rd-agent/token:ro" \
    -e RD_CLIENT_TOKEN_FILE=/etc/rd-agent/token --entrypoint /usr/local/bin/rd-client \
    "$image" -connect "ws://rd-server.image-test.invalid:${tunnel##*:}/connect" -id bar \
    --allow "tcp:$dummy" > /dev/null 2> "$work/client-image.log" &
pids+=($!)
wait_line "$work/server.log" 'Handling backend connection request \[foo\]' "$server_pid" > /dev/null
wait_line "$work/server.log" 'Handling backend connection request \[bar\]' "$server_pid" > /dev/null

# --- requests through both tunnels ----------------------------------------------------------
for agent in foo bar; do
    url="http://$admin/client/$agent/http/$dummy/blob.bin"
    curl -sS --fail --max-time 30 -H "Authorization: Bearer $admin_token" -o "$work/got-$agent.bin" "$url"
    cmp "$work/www/blob.bin" "$work/got-$agent.bin" || { say "download through $agent differs"; exit 1; }
done
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://$admin/client/foo/http/$dummy/blob.bin")
[[ "$code" == "401" ]] || { say "/client without credentials answered $code, want 401"; exit 1; }
say "downloads through the host client and the in-image client are byte-exact; no credentials: 401"

# --- probes ---------------------------------------------------------------------------------
for path in /healthz /livez /readyz; do
    code=$(curl -s -o "$work/probe.txt" -w '%{http_code}' --max-time 10 "http://$admin$path")
    [[ "$code" == "200" ]] || { say "$path answered $code: $(cat "$work/probe.txt")"; exit 1; }
done
say "/healthz, /livez and /readyz answered 200"

# --- SIGTERM, as the kubelet sends it --------------------------------------------------------
docker stop -t 60 "$server" > /dev/null
status=0
wait "$server_pid" || status=$?
[[ $status -eq 0 ]] || { say "rd-server exited with status $status after SIGTERM, want 0"; exit 1; }
if grep -q 'panicked' "$work"/server.log "$work"/client-*.log; then
    say "a panic in the logs"
    exit 1
fi
say "SIGTERM: rd-server (PID 1 in the container) exited with status 0"
say "passed"
