"""A bounded soak of the server on the loopback: it starts the service in this process
(the default model unless --checkpoint), drives it for --seconds with concurrent clients
of every kind, then checks what was left behind, and stops by itself.

    python scripts/soak.py --seconds 120 --dtype bfloat16 --out docs/bench/soak.json

Clients, all at once: native streaming clients sampling (a seed each) in several modes;
an OpenAI streaming client; cancellers (a stream closed after its first chunks);
disconnecters (a socket closed mid-reply); slow readers (a socket that reads nothing for
seconds, then closes; cut by write_timeout if its reply outgrows the socket buffers);
garbage (broken frames and bodies); slow senders (issue 40: connections from four
addresses of another loopback range that send their request a byte a second, on both
endpoints, more of them than one range may hold: each is refused or cut at
request_timeout, and opens again).
Afterwards: requests served, errors by code (of well-formed requests; what the garbage
got is counted apart), engines leaked (an engine out of the pool or a KV cache not empty: must
be 0), tokens changed (each sampled reply of a speculative mode against `ar` with the
same seed, asked again after the load: must be 0), what the slow senders got, by code
(every one a refusal or a request_timeout), TTFT and inter-token latency p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgpack  # noqa: E402

from configs.files import load_config  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.serving.client import Client, ServerError  # noqa: E402
from runtime.serving.native_server import NativeServer  # noqa: E402
from runtime.serving.openai_api import OpenAIApi  # noqa: E402
from runtime.serving.protocol import HEADER  # noqa: E402
from runtime.serving.service import Service  # noqa: E402

PROMPTS = ["Name three colours.", "Write a haiku about rivers.", "What is 12 times 7?", "Give me a tip for sleeping well.",
           "Explain what a CPU does in one sentence."]
GARBAGE = [b"\xc1", b"", b"\x91" * 5000, msgpack.packb({"type": "request", "id": 1, "prompt": 5}),
           msgpack.packb({"type": "request", "id": 1, "prompt": "x", "temperature": float("nan")}),
           msgpack.packb({"type": "request", "id": 1, "prompt": "x", "mode": "pipeline"})]
SLOW_HOSTS = [f"127.0.1.{i}" for i in range(2, 6)]  # another /24 than the clients' 127.0.0.1
HTTP_GARBAGE = [(b"[" * 100_000, "application/json"), (b'{"messages": [}', "application/json"),
                (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "application/json"),
                (b'{"model": "m", "messages": []}', "text/plain"), (b'{"max_tokens": ' + b"9" * 5000 + b"}", "application/json")]


class Soak:
    def __init__(self, args, native, http):
        self.args, self.native, self.http = args, native, http
        self.deadline = time.monotonic() + args.seconds
        self.served = Counter()  # completed replies by client kind
        self.errors = Counter()  # errors that well-formed requests got, by code (or HTTP status)
        self.refusals = Counter()  # what the garbage got, by HTTP status and code: every one should be a 4xx
        self.slow = Counter()  # what the slow senders got, by endpoint and code
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.sampled: list[dict] = []  # replies of speculative modes, to compare with ar

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def streamer(self, rng: random.Random) -> None:
        async with Client(*self.native, timeout=300) as client:
            while self.running():
                prompt, mode, seed = rng.choice(PROMPTS), rng.choice(self.args.modes), rng.randrange(1 << 31)
                sampling = dict(temperature=0.8, top_k=50, top_p=0.95, seed=seed)
                sent, last, ids = time.perf_counter(), None, []
                try:
                    stream = client.stream(prompt, mode=mode, max_new_tokens=self.args.max_new_tokens, **sampling)
                    async for chunk in stream:
                        now = time.perf_counter()
                        if chunk.token_ids:
                            if last is None:
                                self.ttft.append(now - sent)
                            else:
                                self.itl += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                            last, ids = now, ids + chunk.token_ids
                except ServerError as e:
                    self.errors[e.code] += 1
                    continue
                self.served["native stream"] += 1
                if mode != "ar":
                    self.sampled.append({"prompt": prompt, "mode": mode, "sampling": sampling, "tokens": ids})

    async def openai_streamer(self, rng: random.Random) -> None:
        url = f"http://{self.http[0]}:{self.http[1]}/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            while self.running():
                body = {"model": "m", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
                        "max_tokens": self.args.max_new_tokens, "temperature": 0.8, "seed": rng.randrange(1 << 31),
                        "stream_options": {"include_usage": True}, "mode": rng.choice(self.args.modes)}
                async with http.post(url, json=body) as response:
                    text = await response.text()
                    if response.status == 200 and text.rstrip().endswith("data: [DONE]"):
                        self.served["openai stream"] += 1
                    else:
                        self.errors[f"http {response.status}"] += 1

    async def canceller(self, rng: random.Random) -> None:
        async with Client(*self.native, timeout=300) as client:
            while self.running():
                try:
                    async with client.stream(rng.choice(PROMPTS), max_new_tokens=self.args.max_new_tokens) as stream:
                        async for _ in stream:
                            if rng.random() < 0.5:
                                break
                    self.served["cancelled"] += 1
                except ServerError as e:
                    self.errors[e.code] += 1

    async def disconnecter(self, rng: random.Random) -> None:
        while self.running():
            reader, writer = await asyncio.open_connection(*self.native)
            body = msgpack.packb({"type": "request", "id": 1, "prompt": rng.choice(PROMPTS)})
            writer.write(HEADER.pack(len(body)) + body)
            await asyncio.wait_for(reader.read(1), 300)  # the first byte of the first answer, then gone
            writer.transport.abort()
            self.served["disconnected"] += 1
            await asyncio.sleep(rng.uniform(0.5, 2))

    async def slow_reader(self, rng: random.Random) -> None:
        while self.running():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.native)
            reader, writer = await asyncio.open_connection(sock=sock)
            body = msgpack.packb({"type": "request", "id": 1, "prompt": rng.choice(PROMPTS)})
            writer.write(HEADER.pack(len(body)) + body)
            await asyncio.sleep(rng.uniform(2, 6))  # reads nothing meanwhile
            writer.close()
            self.served["slow reader"] += 1

    async def garbage(self, rng: random.Random) -> None:
        url = f"http://{self.http[0]}:{self.http[1]}/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            while self.running():
                reader, writer = await asyncio.open_connection(*self.native)
                body = rng.choice(GARBAGE)
                writer.write(HEADER.pack(len(body)) + body)
                head = await asyncio.wait_for(reader.readexactly(4), 60)
                answer = msgpack.unpackb(await reader.readexactly(HEADER.unpack(head)[0]))
                self.refusals[answer.get("code", "?")] += 1
                writer.close()
                data, content_type = rng.choice(HTTP_GARBAGE)
                async with http.post(url, data=data, headers={"Content-Type": content_type}) as response:
                    code = (await response.json(content_type=None))["error"]["code"]
                    self.refusals[f"http {response.status} {code}"] += 1
                await asyncio.sleep(0.2)

    async def slow_sender(self, rng: random.Random, http: bool) -> None:
        """A connection that sends its request a byte a second until answered (a refusal,
        or request_timeout), then another, from one of SLOW_HOSTS."""
        host = rng.choice(SLOW_HOSTS)
        body = json.dumps({"messages": [{"role": "user", "content": "slow"}]}).encode()
        data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)) if http else HEADER.pack(len(body)) + body
        while self.running():
            reader, writer = await asyncio.open_connection(*(self.http if http else self.native), local_addr=(host, 0))

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for i in range(len(data)):
                        writer.write(data[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(1.0)

            sender = asyncio.create_task(trickle())
            try:
                answer = await asyncio.wait_for(reader.read(), 120)
                if http:
                    head, _, payload = answer.partition(b"\r\n\r\n")
                    code = f"http {head.split()[1].decode()} {json.loads(payload)['error']['code']}"
                else:
                    code = "native " + msgpack.unpackb(answer[HEADER.size : HEADER.size + HEADER.unpack(answer[:4])[0]])["code"]
            except (ConnectionError, asyncio.TimeoutError, ValueError, IndexError, KeyError) as e:
                code = f"{'http' if http else 'native'} no answer: {type(e).__name__}"  # must not happen
            self.slow[code] += 1
            sender.cancel()
            writer.close()
            await asyncio.sleep(rng.uniform(0, 0.5))

    async def compare_with_ar(self) -> tuple[int, int]:
        """(replies compared, replies whose tokens differ from ar's with the same seed)."""
        changed, compared = 0, self.sampled[: self.args.compare]
        async with Client(*self.native, timeout=600) as client:
            for reply in compared:
                ar = await client.generate(reply["prompt"], mode="ar", max_new_tokens=self.args.max_new_tokens, **reply["sampling"])
                changed += ar.token_ids != reply["tokens"]
        return len(compared), changed


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")


async def drive(args, service: Service, native, http, engines) -> dict:
    soak = Soak(args, native, http)
    kinds = [soak.streamer] * args.streamers + [soak.openai_streamer, soak.canceller, soak.disconnecter,
                                                soak.slow_reader, soak.garbage]
    slow = [functools.partial(soak.slow_sender, http=http) for http in (False, True) for _ in range(args.slow_senders)]
    start = time.monotonic()
    await asyncio.gather(*(kind(random.Random(i)) for i, kind in enumerate(kinds + slow)))
    load_seconds = time.monotonic() - start
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (service.free_engines == len(engines) and service.waiting == 0):
        await asyncio.sleep(0.1)
    leaked = (len(engines) - service.free_engines) + sum(e.cache.length != 0 for e in engines)
    compared, changed = await soak.compare_with_ar()
    ms = lambda values, q: round(1000 * percentile(values, q), 1)  # noqa: E731
    return {
        "seconds": round(load_seconds, 1), "modes": args.modes, "max_new_tokens": args.max_new_tokens,
        "requests_served": dict(soak.served), "requests_served_total": sum(soak.served.values()),
        "errors_by_code": dict(sorted(soak.errors.items())), "garbage_refused_by_code": dict(sorted(soak.refusals.items())),
        "slow_senders_by_code": dict(sorted(soak.slow.items())), "request_timeout": service.config.server.request_timeout,
        "engines_leaked": leaked,
        "replies_compared_with_ar": compared, "tokens_changed": changed,
        "ttft_ms": {"p50": ms(soak.ttft, 50), "p99": ms(soak.ttft, 99)},
        "inter_token_ms": {"p50": ms(soak.itl, 50), "p99": ms(soak.itl, 99)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120, help="how long the load runs")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="ar,pld,ht-pld", help="modes the sampling clients pick from")
    parser.add_argument("--streamers", type=int, default=3, help="native streaming clients")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--compare", type=int, default=20, help="sampled replies compared with ar afterwards")
    parser.add_argument("--slow-senders", type=int, default=80, help="slow-sending connections at a time, per endpoint")
    parser.add_argument("--request-timeout", type=float, default=3.0, help="[server] request_timeout for the soak")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    config = load_config()
    config.model.checkpoint, config.model.dtype, config.runtime.threads = args.checkpoint, args.dtype, args.threads
    s = config.server
    s.port, s.http_port, s.write_timeout, s.max_connections_per_peer = 0, 0, 2.0, 64
    s.request_timeout = args.request_timeout
    config.validate()
    engine = Engine.from_config(config)
    for mode in args.modes:
        engine.mode(mode)  # built (and warmed) before the clock starts
        list(engine.steps(engine.encode_chat("warm up"), mode, 4))
    engines = [engine]

    async def serve_and_drive() -> dict:
        service = Service(engines, config)
        native, api = NativeServer(service, s), OpenAIApi(service, "soak")
        try:
            native_address = await native.start()
            http_address = await api.start(s.host, 0)
            return await drive(args, service, native_address, http_address, engines)
        finally:
            await api.close()
            await native.close()
            service.close()

    result = asyncio.run(serve_and_drive())  # server and clients on one loop; decoding runs in its threads
    result["command"] = "python scripts/soak.py " + " ".join(sys.argv[1:])
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    unanswered = [code for code in result.get("slow_senders_by_code", {}) if "no answer" in code]  # a refusal lost
    return 0 if result.get("engines_leaked") == 0 and result.get("tokens_changed") == 0 and not unanswered else 1


if __name__ == "__main__":
    sys.exit(main())
