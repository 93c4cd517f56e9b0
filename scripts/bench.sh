#!/usr/bin/env bash
# Benchmarks (docs/BENCHMARKS.md): what keeping the ticket keys in a PKCS#11 token
# costs, next to the token's own floor and next to in-memory ticket keys.
# Builds Release into its own build directory, runs everything once and
# prints a table of medians followed by one line per ratio:
#
#   ratio <name> <value>     (value "n/a" when it could not be measured)
#
#   scripts/bench.sh            # full run (about 10 minutes on 2 CPUs)
#   scripts/bench.sh --quick    # fewer/shorter repetitions (about 1.5
#                               # minutes plus the build)
#
# Environment: BUILD_DIR (default build-bench), JOBS (default 2),
# RESULTS_DIR (default $BUILD_DIR/bench-results), NGINX (default
# /usr/sbin/nginx), SOFTHSM_MODULE (default /usr/lib/softhsm/libsofthsm2.so).
#
# Parts: (1)-(4) run in one hsmstek_bench process: paired benchmarks in
# which the compared variants alternate inside one loop (so they see the
# same machine conditions), repeated and randomly interleaved by Google
# Benchmark; (5) two processes, one plain and one with process-wide routing
# (hsmstek_enable_process_wide is process-global), taking turns; (6) starts
# two nginx instances on loopback (OpenSSL's built-in tickets / the hsmstek
# module, 1 worker each, on a throwaway SoftHSM token) and alternates the
# load between them; (7) the network-HSM latency model (bench/latency.sh):
# nginx on the fault module with every token call delayed. See
# docs/BENCHMARKS.md for the method.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

build=${BUILD_DIR:-build-bench}
jobs=${JOBS:-2}
results=${RESULTS_DIR:-$build/bench-results}
nginx_bin=${NGINX:-/usr/sbin/nginx}
softhsm_so=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

# Many short repetitions rather than a few long ones: on a shared machine
# the median of interleaved short runs is the more stable figure.
if [ "$quick" = 1 ]; then
  reps=5 min_time=0.1            # in-process: per benchmark and repetition
  pairs=2 pair_rounds=30         # process pairs x turns of each process
  nginx_rounds=2 nginx_secs=2
  latency_delays="200us 1ms" latency_secs=2 latency_full=10
else
  reps=20 min_time=0.5
  pairs=10 pair_rounds=50
  nginx_rounds=6 nginx_secs=5
  latency_delays="0 100us 200us 500us 1ms 2ms" latency_secs=5 latency_full=20
fi

log() { echo "bench.sh: $*" >&2; }

# --- build ---------------------------------------------------------------------

nginx_build=OFF
if [ -f /usr/share/nginx/src/configure ] && [ -x "$nginx_bin" ]; then
  nginx_build=ON
fi
log "building Release in $build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DHSMSTEK_BUILD_TESTS=ON -DHSMSTEK_BUILD_NGINX=$nginx_build >"$build.cmake.log" 2>&1 ||
  { cat "$build.cmake.log" >&2; exit 1; }
cmake --build "$build" -j "$jobs" --target hsmstek_bench hsmstek_tls_loader >&2
build=$(cd "$build" && pwd)  # absolute: nginx resolves paths from its prefix
bench=$build/bench/hsmstek_bench
loader=$build/bench/hsmstek_tls_loader

nginx_na=
mod_dir=$build/src/nginx
if [ "$nginx_build" = OFF ]; then
  nginx_na="nginx or nginx-dev (/usr/share/nginx/src) not installed"
elif ! cmake --build "$build" -j "$jobs" --target nginx_modules hsmstek_faulty hsmstek_cli >&2; then
  nginx_na="the nginx_modules target failed to build"
elif [ ! -f "$mod_dir/ngx_http_hsmstek_module.so" ]; then
  nginx_na="ngx_http_hsmstek_module.so was not built"
fi

rm -rf "$results"
mkdir -p "$results"

# --- machine facts ---------------------------------------------------------------

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# parallelism: the CPU this shared machine gives us right now, as the
# throughput of 2 parallel openssl speed processes over 1 (2.00 = two free
# cores; 1.00 = the equivalent of one).
parallelism() {
  local one two
  one=$(openssl speed -seconds 1 -multi 1 -evp sha256 2>/dev/null | awk '/^sha256/ { v = $NF } END { sub("k", "", v); print v }')
  two=$(openssl speed -seconds 1 -multi 2 -evp sha256 2>/dev/null | awk '/^sha256/ { v = $NF } END { sub("k", "", v); print v }')
  awk -v a="$one" -v b="$two" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "n/a" }'
}
python3 - "$results/meta.json" "$quick" "$(loadavg)" "$nginx_bin" "$(parallelism)" <<'EOF'
import json, os, re, subprocess, sys, time
def run(*cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip()
    except OSError:
        return "n/a"
cpu = "?"
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip(); break
mem = "?"
with open("/proc/meminfo") as f:
    for line in f:
        if line.startswith("MemTotal"):
            mem = "%.1f GiB" % (int(line.split()[1]) / 1048576); break
softhsm = re.search(r"Version: (\S+)", run("dpkg", "-s", "softhsm2"))
nginx = re.search(r"nginx/(\S+)", run(sys.argv[4], "-v"))
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "cpu": cpu, "nproc": os.cpu_count(), "memory": mem,
    "load_before": sys.argv[3],
    "parallelism_before": sys.argv[5],
    "openssl": run("openssl", "version"),
    "softhsm": softhsm.group(1) if softhsm else run("softhsm2-util", "--version"),
    "nginx": nginx.group(1) if nginx else "n/a",
    "quick": sys.argv[2] == "1",
}, open(sys.argv[1], "w"))
EOF

# --- (1)-(4): one process, all variants interleaved -----------------------------

log "in-process benchmarks ($reps repetitions, min_time $min_time s)"
"$bench" --benchmark_filter='^(pair|scaling)/|^evp/(seal|open)/nginx_style/.*threads:1$' \
  --benchmark_repetitions="$reps" --benchmark_min_time="$min_time" \
  --benchmark_enable_random_interleaving=true \
  --benchmark_out="$results/inproc.json" --benchmark_out_format=json \
  >"$results/inproc.txt" 2>&1 || { cat "$results/inproc.txt" >&2; exit 1; }

# --- (5): full handshakes, plain vs process-wide, two processes in turns -----

# Several pairs of fresh processes: a process's memory layout shifts its
# speed by a percent or two; more pairs average that out.
log "full handshakes: $pairs pairs of plain and process-wide processes, $pair_rounds turns each"
: >"$results/full.jsonl"
for _ in $(seq 1 "$pairs"); do
  "$bench" --process-pair="$pair_rounds" >>"$results/full.jsonl" 2>"$results/full.err" ||
    { cat "$results/full.err" >&2; exit 1; }
done

# --- (6): nginx --------------------------------------------------------------------

nginx_out=$results/nginx.jsonl
tmp=
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -QUIT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
  if [ -n "$tmp" ]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT

na() { echo "{\"na\": \"$1\"}" >>"$nginx_out"; log "nginx: n/a: $1"; }

# free_ports N: N distinct, currently unused loopback TCP ports.
free_ports() {
  python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
# worker_of MASTER_PID: the (single) worker's pid.
worker_of() { pgrep -P "$1" | head -n 1; }
# cpu_s PID: user + system CPU seconds of PID so far.
cpu_s() {
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"
}

run_nginx() {
  for f in "$softhsm_so" "$nginx_bin"; do
    [ -e "$f" ] || { na "missing $f"; return; }
  done
  command -v softhsm2-util >/dev/null || { na "softhsm2-util not installed"; return; }
  tmp=$(mktemp -d /tmp/hsmstek-bench-nginx.XXXXXX)
  export SOFTHSM2_CONF=$tmp/softhsm2.conf
  mkdir -p "$tmp/tokens"
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$tmp" >"$SOFTHSM2_CONF"
  softhsm2-util --init-token --free --label bench --so-pin 12345678 --pin 1234 \
    >/dev/null || { na "softhsm2-util --init-token failed"; return; }
  printf '1234\n' >"$tmp/pin"
  chmod 600 "$tmp/pin"
  local uri="pkcs11:token=bench;object=tickets?module-path=$softhsm_so&pin-source=file:$tmp/pin"
  "$bench" --provision="$uri" || { na "provisioning the store failed"; return; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj /CN=localhost -days 2 \
    >/dev/null 2>&1 || { na "openssl req failed"; return; }

  local user_line=
  [ "$(id -u)" -eq 0 ] && user_line="user root root;"
  local ports status_port
  read -r -a ports <<<"$(free_ports 3)"
  local -A port=([builtin]=${ports[0]} [hsmstek]=${ports[1]})
  status_port=${ports[2]}
  local -A master=()
  local v
  for v in builtin hsmstek; do
    mkdir -p "$tmp/$v"
    local load="" store="" tickets="" status=""
    if [ "$v" = hsmstek ]; then
      load="load_module $mod_dir/ngx_http_hsmstek_module.so;"
      store="hsmstek_store bench \"$uri\";"
      tickets="hsmstek_tickets bench;"
      # Counters, to check afterwards that the token really sealed/opened.
      status="server { listen 127.0.0.1:$status_port; location = /hsmstek { hsmstek_status; } }"
    fi
    cat >"$tmp/$v/nginx.conf" <<EOF
$load
$user_line
daemon off;
worker_processes 1;
pid $tmp/$v/nginx.pid;
error_log $tmp/$v/error.log notice;
env SOFTHSM2_CONF;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $tmp/$v/body;
    proxy_temp_path $tmp/$v/proxy;
    fastcgi_temp_path $tmp/$v/fastcgi;
    uwsgi_temp_path $tmp/$v/uwsgi;
    scgi_temp_path $tmp/$v/scgi;
    ssl_certificate $tmp/cert.pem;
    ssl_certificate_key $tmp/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    $store
    server {
        listen 127.0.0.1:${port[$v]} ssl;
        $tickets
        location / { return 200 "ok\n"; }
    }
    $status
}
EOF
    "$nginx_bin" -p "$tmp/$v/" -c "$tmp/$v/nginx.conf" >"$tmp/$v/stderr" 2>&1 &
    master[$v]=$!
    pids+=("${master[$v]}")
  done
  local ready=0
  for _ in $(seq 1 100); do
    if grep -q "start worker process" "$tmp/builtin/error.log" 2>/dev/null &&
       grep -q "start worker process" "$tmp/hsmstek/error.log" 2>/dev/null; then
      ready=1
      break
    fi
    sleep 0.1
  done
  if [ "$ready" != 1 ]; then
    na "nginx did not start: $(tail -n 2 "$tmp/hsmstek/error.log" "$tmp/hsmstek/stderr" 2>/dev/null | tr '"\n' "' ")"
    return
  fi
  local -A worker=()
  for v in builtin hsmstek; do
    worker[$v]=$(worker_of "${master[$v]}")
    [ -n "${worker[$v]}" ] || { na "no nginx worker for $v"; return; }
  done

  # Warm-up (first ticket keys, code paths, allocator). The loader fails
  # if the server issues no ticket or never resumes (e.g. token not ready:
  # the module fails closed).
  for v in builtin hsmstek; do
    "$loader" "127.0.0.1:${port[$v]}" 1.3 0.5 >/dev/null ||
      { na "no TLS 1.3 resumption against $v: $(tail -n 2 "$tmp/$v/error.log" | tr '"\n' "' ")"; return; }
  done

  log "nginx: $nginx_rounds rounds x (TLS 1.3, TLS 1.2) x (builtin, hsmstek), $nginx_secs s each"
  local round tls before after out n r secs t0 t1 order
  for round in $(seq 1 "$nginx_rounds"); do
    if [ $((round % 2)) = 1 ]; then order="builtin hsmstek"; else order="hsmstek builtin"; fi
    for tls in 1.3 1.2; do
      for v in $order; do
        before=$(cpu_s "${worker[$v]}")
        if [ "$tls" = 1.3 ]; then
          out=$("$loader" "127.0.0.1:${port[$v]}" 1.3 "$nginx_secs") ||
            { na "loader failed against $v"; return; }
          n=$(sed -E 's/.*"handshakes":([0-9]+).*/\1/' <<<"$out")
          r=$(sed -E 's/.*"resumed":([0-9]+).*/\1/' <<<"$out")
          secs=$(sed -E 's/.*"seconds":([0-9.]+).*/\1/' <<<"$out")
        else
          # s_time prints one character per connection on progress lines
          # ('r' = resumed), then "N connections in ..."; it runs up to a
          # second longer than -time, so the wall time is measured here.
          t0=$(date +%s.%N)
          out=$(openssl s_time -connect "127.0.0.1:${port[$v]}" -reuse -tls1_2 \
                -www / -time "$nginx_secs" 2>&1) ||
            { na "openssl s_time failed against $v"; return; }
          t1=$(date +%s.%N)
          n=$(grep -oE '^[0-9]+ connections in [0-9.]+s' <<<"$out" | head -n 1 | cut -d' ' -f1)
          r=$(grep -E '^[rt3*]+$' <<<"$out" | tr -cd 'r' | wc -c)
          secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')
        fi
        after=$(cpu_s "${worker[$v]}")
        [ -n "$n" ] && [ "$n" -gt 0 ] || { na "no handshakes measured ($v, TLS $tls)"; return; }
        printf '{"variant":"%s","tls":"%s","handshakes":%s,"resumed":%s,"seconds":%s,"worker_cpu_s":%s}\n' \
          "$v" "$tls" "$n" "$r" "$secs" \
          "$(awk -v a="$before" -v b="$after" 'BEGIN { printf "%.3f", b - a }')" >>"$nginx_out"
      done
    done
  done
  # The hsmstek worker's own counters: every resumption went through the token.
  local page issued
  page=$(curl -s --max-time 10 "http://127.0.0.1:$status_port/hsmstek" || true)
  issued=$(awk '/^hsmstek_tickets_issued_total/ { print $2 }' <<<"$page")
  if [ -z "$issued" ] || [ "$issued" -eq 0 ]; then
    na "the hsmstek worker reports no ticket issued"
    return
  fi
  printf '{"counters":{"issued":%s,"resumed":%s,"renewed":%s,"token_errors":%s}}\n' \
    "$issued" \
    "$(awk '/^hsmstek_tickets_resumed_total/ { print $2 }' <<<"$page")" \
    "$(awk '/^hsmstek_tickets_renewed_total/ { print $2 }' <<<"$page")" \
    "$(awk '/^hsmstek_token_errors_total/ { print $2 }' <<<"$page")" >>"$nginx_out"
  printf '{"rss_kb":{"builtin":%s,"hsmstek":%s}}\n' \
    "$(awk '/VmHWM/ { print $2 }' "/proc/${worker[builtin]}/status")" \
    "$(awk '/VmHWM/ { print $2 }' "/proc/${worker[hsmstek]}/status")" >>"$nginx_out"
}

if [ -n "$nginx_na" ]; then
  na "$nginx_na"
else
  run_nginx
fi
cleanup

# --- (7): network HSM: every token call delayed (bench/latency.sh) ------------

latency_out=$results/latency.jsonl
rm -f "$latency_out"
if [ -n "$nginx_na" ]; then
  log "latency: n/a: $nginx_na"
elif ! bench/latency.sh --build "$build" --out "$latency_out" \
       --delays "$latency_delays" --secs "$latency_secs" --clients 8 \
       --full "$latency_full"; then
  log "latency: the latency part failed"
  rm -f "$latency_out"
fi

python3 - "$results/meta.json" "$(loadavg)" "$(parallelism)" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1])); m["load_after"] = sys.argv[2]
m["parallelism_after"] = sys.argv[3]
json.dump(m, open(sys.argv[1], "w"))
EOF

python3 bench/report.py "$results" | tee "$results/report.txt"
if [ -s "$latency_out" ]; then
  python3 bench/latency_report.py "$latency_out" | tee -a "$results/report.txt"
else
  printf '%s n/a\n' "ratio nginx_tls13_resume_1ms_vs_blocking" \
    "ratio nginx_tls12_resume_1ms_vs_blocking" "rtt tls13_resume" \
    "rtt tls12_resume" "rtt tls13_full" | tee -a "$results/report.txt"
fi
