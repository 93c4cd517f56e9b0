#!/usr/bin/env python3
"""Times small requests on one keep-alive TLS connection (docs/BENCHMARKS.md, "Network HSM").

    latency_probe.py PORT SECONDS OUT

Sends "GET /probe" every 10 ms on a single HTTP/1.1 keep-alive connection
to 127.0.0.1:PORT for SECONDS and writes one latency per line (ms) to OUT.
The connection's handshake happens before the timing starts, so every
sample is an ordinary request: what it measures is how long the server's
event loop leaves it waiting while it does other connections' ticket work.
"""
import http.client
import ssl
import sys
import time


def main():
    port, seconds, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx,
                                       timeout=30)
    conn.request("GET", "/probe")
    conn.getresponse().read()
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        conn.request("GET", "/probe")
        conn.getresponse().read()
        samples.append((time.monotonic() - t0) * 1000.0)
        time.sleep(0.01)
    conn.close()
    with open(out, "w") as f:
        f.write("".join("%.3f\n" % s for s in samples))


if __name__ == "__main__":
    main()
