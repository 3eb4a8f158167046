#!/usr/bin/env bash
# One tollgate row for ../shared/bench/peers.py: writes a config for MODE and runs release
# tollgate in the foreground with one worker thread (the nginx and HAProxy rows use one too).
#   bench/row.sh MODE LISTEN_PORT UPSTREAM REDIS_URL TMPDIR
# MODE: nolimit | trace0 | trace1 | memory | memory_consumers | memory_keys100k | memory_jwt | redis_tb | redis_gcra | redis_tb_10k | redis_count | redis_count_refund | redis_concurrency | redis_batch | flood_memory | flood_redis
# memory_consumers: 100,000 consumers (keys key-1 .. key-100000 in x-api-key), a consumer-keyed
# token bucket on the memory store; memory_keys100k: the same bucket keyed by the raw header
# (the store's share of that row's cost, without the consumer lookup); memory_jwt: a token
# bucket keyed by jwt:sub, RS256 tokens verified against the test fixture's JWKS.
# trace0 / trace1: no limit, with [telemetry] at sample_ratio 0 / 1, spans sent to
# TRACE_ENDPOINT (default: the upstream nginx, which answers every POST with 200).
# UPSTREAM_TARGET replaces the target URL (an https:// or h2c upstream), UPSTREAM_EXTRA adds
# lines to its table (`tls = { ca = "…" }`, `protocol = "h2"`).
set -euo pipefail
mode=$1 port=$2 upstream=$3 redis_url=$4 dir=$5
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${TOLLGATE_BIN:-$here/target/release/tollgate}
cfg="$dir/tollgate-$mode.toml"

store_memory='[store]
backend = "memory"'
store_redis="[store]
backend = \"redis\"
url = \"$redis_url\"
timeout = \"100ms\"
pool_size = ${POOL_SIZE:-4}"

case $mode in
  nolimit)      store=$store_memory; limits='' ;;
  trace0|trace1)
    store="$store_memory

[telemetry]
otlp_endpoint = \"${TRACE_ENDPOINT:-http://$upstream}\"
sample_ratio = ${mode#trace}"
    limits='' ;;
  memory)       store=$store_memory; limits='limits = [{ by = "ip", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000 }]' ;;
  memory_consumers)
    store="$store_memory

[consumers]
key = \"header:x-api-key\"
file = \"consumers-100k.toml\"
plans = [\"free\", \"pro\"]
default_plan = \"free\""
    limits='limits = [{ by = "consumer", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000, plans = { pro = { rate = "1000000000/s", burst = 1000000000 } } }]'
    if [ ! -s "$dir/consumers-100k.toml" ]; then
      seq 1 100000 | sed 's/^/key-/' | "$bin" hash-key --each-line |
        awk '{ printf "[[consumer]]\nname = \"c%d\"\nplan = \"%s\"\nkeys = [\"%s\"]\n", NR, (NR % 2 ? "free" : "pro"), $0 }' \
        > "$dir/consumers-100k.toml"
    fi ;;
  memory_jwt)
    store="$store_memory

[jwt]
jwks_file = \"jwks.json\"
issuer = \"https://id.example.com\""
    limits='limits = [{ by = "jwt:sub", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000 }]'
    printf '{"keys": [%s]}\n' "$(cat "$here/tests/fixtures/jwt/rsa-public.jwk.json")" > "$dir/jwks.json" ;;
  memory_keys100k) store=$store_memory; limits='limits = [{ by = "header:x-api-key", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000 }]' ;;
  redis_tb)     store=$store_redis;  limits='limits = [{ by = "ip", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000 }]' ;;
  redis_gcra)   store=$store_redis;  limits='limits = [{ by = "ip", algorithm = "gcra", rate = "1000000/s", burst = 1000000000 }]' ;;
  redis_tb_10k) store=$store_redis;  limits='limits = [{ by = "query:k", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000 }]' ;;
  # count: every response counted (no settlement call) / none counted (one refund per request)
  redis_count)  store=$store_redis;  limits='limits = [{ by = "ip", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000, count = ["2xx"] }]' ;;
  redis_count_refund) store=$store_redis; limits='limits = [{ by = "ip", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000, count = ["4xx"] }]' ;;
  redis_concurrency) store=$store_redis; limits='limits = [{ by = "ip", algorithm = "concurrency", max = 1000 }]' ;;
  redis_batch)  store=$store_redis;  limits='limits = [{ by = "ip", algorithm = "token_bucket", rate = "1000000000/s", burst = 1000000000, batch = 100 }]' ;;
  flood_memory) store=$store_memory; limits='limits = [{ by = "ip", algorithm = "fixed_window", rate = "1/hour" }]' ;;
  flood_redis)  store=$store_redis;  limits='limits = [{ by = "ip", algorithm = "fixed_window", rate = "1/hour" }]' ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac

cat > "$cfg" <<TOML
[server]
listen = "127.0.0.1:$port"
workers = 1

$store

[upstreams.up]
targets = ["${UPSTREAM_TARGET:-http://$upstream}"]
${UPSTREAM_EXTRA:-}

[[routes]]
name = "all"
upstream = "up"
$limits
TOML

RUST_LOG=${RUST_LOG:-warn} exec "$bin" run --config "$cfg"
