#!/usr/bin/env python3
"""Drives headless Chromium (Debian's package) over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages separated by NUL bytes on file descriptors 3 and 4), so the
end-to-end tests need no WebDriver and no Python package.

  browser.py URL OUTDIR
      opens URL, then reads commands from stdin, one per line, and answers each on stdout:
        wait SECONDS JS     until the JavaScript expression JS is true (at most SECONDS):
                            "ok <seconds taken>" or "timeout <the expression's last value>"
        eval JS             "value <JSON of JS's value>"
        shot NAME           saves OUTDIR/NAME.png (the whole page): "saved <path>"
        quit                closes the browser
      Chromium's own messages go to OUTDIR/chromium.log. Everything is bounded: each wait by its
      SECONDS, each protocol answer by 20 s, the whole run by the caller's timeout.
"""
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

ANSWER_TIMEOUT = 20.0


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("browser.py: no chromium (apt-get install chromium)")


class DevTools:
    def __init__(self, outdir):
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="ferry-chromium-")
        log = open(os.path.join(outdir, "chromium.log"), "wb")

        def fds():  # the child's fd 3 reads commands, fd 4 writes answers
            r, w = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
             "--user-data-dir=" + self.profile, "--window-size=1400,1000", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=fds, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self.next_id = 0
        self.buf = b""
        self.session = None

    def call(self, method, params=None, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                m = json.loads(raw)
                if m.get("id") == self.next_id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method}: no answer within {ANSWER_TIMEOUT} s")
            r, _, _ = select.select([self.from_child], [], [], 0.5)
            if r:
                chunk = os.read(self.from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its pipe (see chromium.log)")
                self.buf += chunk

    def open(self, url):
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})

    def eval(self, js):
        r = self.call("Runtime.evaluate", {"expression": js, "returnByValue": True})
        if "exceptionDetails" in r:
            return {"exception": r["exceptionDetails"].get("text")}
        return r.get("result", {}).get("value")

    def shot(self, path):
        m = self.call("Page.getLayoutMetrics")
        size = m.get("cssContentSize") or m.get("contentSize")
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def close(self):
        try:
            self.call("Browser.close", session=False)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def main():
    url, outdir = sys.argv[1], sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    dt = DevTools(outdir)
    try:
        dt.open(url)
        print("opened", flush=True)
        for line in sys.stdin:
            cmd, _, rest = line.strip().partition(" ")
            if cmd == "wait":
                secs, _, js = rest.partition(" ")
                start = time.monotonic()
                deadline = start + min(float(secs), 120)
                while True:
                    v = dt.eval(js)
                    if v is True:
                        print(f"ok {time.monotonic() - start:.2f}", flush=True)
                        break
                    if time.monotonic() > deadline:
                        print(f"timeout {json.dumps(v)}", flush=True)
                        break
                    time.sleep(0.2)
            elif cmd == "eval":
                print("value", json.dumps(dt.eval(rest)), flush=True)
            elif cmd == "shot":
                path = os.path.join(outdir, rest + ".png")
                dt.shot(path)
                print("saved", path, flush=True)
            elif cmd == "quit":
                break
            else:
                print("unknown command", cmd, flush=True)
    finally:
        dt.close()


if __name__ == "__main__":
    main()
