#!/usr/bin/env bash
# The cluster walkthrough of docs/serving.md, end to end on this machine's loopback:
# ray start --head, submit the service as a job, stream a reply from it with the native
# client and the openai package, stop the job, ray stop.
#
#   . .venv/bin/activate && bash scripts/ray_loopback_e2e.sh
#
# `ray stop` ends every Ray process of this user on the machine: do not run it beside
# another Ray cluster of yours.
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep every Ray address on the loopback (by default Ray picks the node's network address).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
DASHBOARD=http://127.0.0.1:8265

ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --num-cpus 2 --disable-usage-stats
trap 'ray stop' EXIT

submitted=$(python scripts/ray_submit.py --address "$DASHBOARD" -- --host 127.0.0.1 --port 0 --http-port 0)
echo "$submitted"
job=$(sed -n 's/^submitted job //p' <<<"$submitted")
native=$(sed -n 's/^leapfrog replica 0: native \([^ ]*\).*/\1/p' <<<"$submitted")
http=$(sed -n 's/.* http \(http:[^ ]*\)$/\1/p' <<<"$submitted")

python - "$native" "$http" <<'EOF'
import sys

import openai

from runtime.serving.client import SyncClient

host, port = sys.argv[1].rsplit(":", 1)
with SyncClient(host, int(port)) as client:
    stream = client.stream("Write a haiku about rivers.", max_new_tokens=48)
    for chunk in stream:
        print(chunk.text, end="", flush=True)
    print(f"\n[native] {stream.stats}")
oa = openai.OpenAI(base_url=sys.argv[2], api_key="unused")
reply = oa.chat.completions.create(model=oa.models.list().data[0].id, max_tokens=16,
                                   messages=[{"role": "user", "content": "Say hello."}])
print(f"[openai] {reply.choices[0].message.content!r}, finish_reason {reply.choices[0].finish_reason}")
EOF

ray job stop --address "$DASHBOARD" "$job"
ray job status --address "$DASHBOARD" "$job"
