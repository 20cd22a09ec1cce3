#!/usr/bin/env python3
"""Plays the kubelet for Sluice engine pods on the test cluster's kwok node.

kwok schedules pods, gives them an IP and reports them Running, but nothing
runs in their containers. For each engine pod of the watched namespaces that
kwok reports Running, this runs the real `sluice` binary on the pod's query
(its ConfigMap's `query.yaml`, as the pod would mount it), listening on the
pod's IP (a 127.x loopback address: start kube_start with KUBE_POD_CIDR=127.x)
and port 9464, so that the operator reads real /progress and /healthz. It
reports the container to the API server as the kubelet does:

- the engine exits (restartPolicy Always, StatefulSet pods): the container is
  `waiting: CrashLoopBackOff` with `lastState.terminated` (exit code, and the
  termination message: what the engine wrote to its termination log, else
  the tail of its log, as `FallbackToLogsOnError`), `restartCount` + 1; it is
  started again after a backoff (1 s doubling to 8 s: the kubelet's 10 s to
  5 min, scaled down for a test);
- the engine exits (restartPolicy Never, Job pods): the pod is `Succeeded`
  (exit 0) or `Failed`, with the terminated state and its message;
- the liveness probe: `GET /healthz` every `periodSeconds`; after
  `failureThreshold` failures in a row the engine gets SIGTERM, then SIGKILL
  after 5 s (the kubelet waits `terminationGracePeriodSeconds`), and restarts
  as above;
- a pod deleted (or gone): its engine is stopped (SIGTERM, then SIGKILL).

Run in the background by e2e/kube-operator.sh; stop it with SIGTERM (it then
stops every engine it started). Every engine's log is WORK/<pod>-<n>.log.

usage: engine_kubelet.py --sluice BIN --work DIR --namespace NS [--namespace NS...]
                         [--stuck-stdout QUERY...] [--kubectl BIN]

--stuck-stdout QUERY: the engines of that query write their standard output
into a pipe nobody reads, so that a console sink blocks once the pipe is
full: a stuck sink, for the stall detection test.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

PORT = 9464
POLL = 0.5
GRACE = 5.0


def log(message):
    print(f"[kubelet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Kube:
    def __init__(self, kubectl):
        self.kubectl = kubectl

    def run(self, *args, data=None):
        out = subprocess.run([self.kubectl, *args], input=data, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def pods(self, namespace):
        text = self.run("get", "pods", "-n", namespace, "-l",
                        "app.kubernetes.io/managed-by=sluice-operator", "-o", "json")
        return json.loads(text)["items"]

    def config_map(self, namespace, name):
        return json.loads(self.run("get", "configmap", name, "-n", namespace, "-o", "json"))

    def patch_status(self, namespace, name, status):
        self.run("patch", "pod", name, "-n", namespace, "--subresource=status",
                 "--type=merge", "-p", json.dumps({"status": status}))


def pod_env(container, meta):
    """The container's SLUICE_* variables, resolved as the kubelet resolves
    them (values, and the downward API's metadata.name and
    metadata.labels['...']); the rest (credentials, paths) stays this
    machine's."""
    out = {}
    for var in container.get("env") or []:
        name = var["name"]
        if not name.startswith("SLUICE_") or name == "SLUICE_STATE_DIR":
            continue
        if "value" in var:
            out[name] = var["value"]
            continue
        path = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
        if path == "metadata.name":
            out[name] = meta["name"]
        elif path.startswith("metadata.labels['") and path.endswith("']"):
            out[name] = (meta.get("labels") or {}).get(path[len("metadata.labels['"):-2], "")
    return out


class Engine:
    """One pod's engine: the process, its restarts, its probe."""

    def __init__(self, pod, args):
        meta, spec = pod["metadata"], pod["spec"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.query = meta["labels"].get("app.kubernetes.io/instance", "")
        self.ip = pod["status"]["podIP"]
        self.never = spec.get("restartPolicy") == "Never"
        container = spec["containers"][0]
        self.container, self.image = container["name"], container.get("image", "")
        self.env = pod_env(container, meta)
        probe = container.get("livenessProbe") or {}
        self.probe_path = (probe.get("httpGet") or {}).get("path")
        self.probe_period = probe.get("periodSeconds", 10)
        self.probe_threshold = probe.get("failureThreshold", 3)
        self.probe_delay = probe.get("initialDelaySeconds", 0)
        cm = next(v["configMap"]["name"] for v in spec["volumes"] if v.get("configMap"))
        self.config_map = cm
        self.dir = os.path.join(args.work, f"{self.namespace}-{self.name}")
        os.makedirs(os.path.join(self.dir, "state"), exist_ok=True)
        self.stuck = self.query in args.stuck_stdout
        self.sluice = args.sluice
        self.process = None
        self.restarts = 0
        self.start_at = 0.0           # when to start (again)
        self.started_at = 0.0
        self.failures = 0             # liveness probe failures in a row
        self.next_probe = 0.0
        self.killing = None           # when SIGTERM was sent by the probe
        self.done = False             # a Job pod that ended
        self.pipe = None

    def termination_log(self):
        return os.path.join(self.dir, "termination-log")

    def start(self, kube):
        manifest = kube.config_map(self.namespace, self.config_map)["data"]["query.yaml"]
        path = os.path.join(self.dir, "query.yaml")
        with open(path, "w") as f:
            f.write(manifest)
        if os.path.exists(self.termination_log()):
            os.remove(self.termination_log())
        self.log_path = os.path.join(self.dir, f"engine-{self.restarts}.log")
        log_file = open(self.log_path, "w")
        stdout = log_file
        if self.stuck:
            # A pipe this process never reads: the console sink blocks once
            # its 64 KiB are full.
            read, write = os.pipe()
            self.pipe = (read, write)
            stdout = write
        env = dict(os.environ, SLUICE_TERMINATION_LOG=self.termination_log(),
                   SLUICE_STATE_DIR=os.path.join(self.dir, "state"), SLUICE_LOG="info",
                   POD_NAME=self.name, **self.env)
        self.process = subprocess.Popen(
            [self.sluice, "run", path, "--http-address", self.ip, "--http-port", str(PORT)],
            stdout=stdout, stderr=log_file, cwd=self.dir, env=env, start_new_session=True)
        self.started_at = time.time()
        self.next_probe = self.started_at + self.probe_delay
        self.failures = 0
        self.killing = None
        log(f"{self.namespace}/{self.name}: started the engine (pid {self.process.pid}, {self.ip}:{PORT})"
            + (", stdout never read" if self.stuck else ""))
        kube.patch_status(self.namespace, self.name, {
            "phase": "Running",
            "conditions": self.conditions(True),
            "containerStatuses": [self.container_status(
                {"running": {"startedAt": now()}}, ready=True)],
        })

    def conditions(self, ready):
        flag = "True" if ready else "False"
        return [{"type": t, "status": s, "lastTransitionTime": now()} for t, s in
                [("Initialized", "True"), ("Ready", flag), ("ContainersReady", flag),
                 ("PodScheduled", "True")]]

    def container_status(self, state, ready, last=None):
        status = {"name": self.container, "image": self.image, "imageID": "", "ready": ready,
                  "restartCount": self.restarts, "started": ready, "state": state}
        if last:
            status["lastState"] = last
        return status

    def message(self):
        """The termination message: the engine's termination log, else the
        tail of its log (FallbackToLogsOnError, for a failure)."""
        try:
            with open(self.termination_log()) as f:
                text = f.read()
            if text:
                return text
        except FileNotFoundError:
            pass
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-80:])[-2048:]

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.close_pipe()

    def close_pipe(self):
        if self.pipe:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def probe(self):
        """One liveness probe; SIGTERM after `failureThreshold` failures."""
        if not self.probe_path or time.time() < self.next_probe or self.killing:
            return
        self.next_probe = time.time() + self.probe_period
        try:
            with urllib.request.urlopen(f"http://{self.ip}:{PORT}{self.probe_path}", timeout=1) as r:
                ok = r.status == 200
        except Exception:
            ok = False
        self.failures = 0 if ok else self.failures + 1
        if self.failures >= self.probe_threshold:
            log(f"{self.namespace}/{self.name}: liveness probe failed {self.failures} times: SIGTERM")
            os.killpg(self.process.pid, signal.SIGTERM)
            self.killing = time.time()

    def tick(self, kube):
        """Starts, probes and reports the engine; returns False once done."""
        if self.done:
            return False
        if self.process is None:
            if time.time() >= self.start_at:
                self.start(kube)
            return True
        code = self.process.poll()
        if code is None:
            if self.killing and time.time() - self.killing > GRACE:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.probe()
            return True
        self.close_pipe()
        terminated = {"exitCode": code if code >= 0 else 128 - code,
                      "reason": "Completed" if code == 0 else "Error",
                      "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
                      "finishedAt": now(), "message": self.message()}
        log(f"{self.namespace}/{self.name}: the engine exited with {code}: "
            f"{terminated['message'].strip().splitlines()[-1] if terminated['message'].strip() else ''}")
        self.process = None
        if self.never:
            kube.patch_status(self.namespace, self.name, {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": self.conditions(False),
                "containerStatuses": [self.container_status({"terminated": terminated}, ready=False)],
            })
            self.done = True
            return False
        backoff = min(8.0, 2.0 ** self.restarts)
        self.restarts += 1
        self.start_at = time.time() + backoff
        kube.patch_status(self.namespace, self.name, {
            "phase": "Running",
            "conditions": self.conditions(False),
            "containerStatuses": [self.container_status(
                {"waiting": {"reason": "CrashLoopBackOff",
                             "message": f"back-off {backoff:.0f}s restarting failed container={self.container}"}},
                ready=False, last={"terminated": terminated})],
        })
        return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sluice", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--namespace", action="append", required=True)
    parser.add_argument("--stuck-stdout", action="append", default=[])
    parser.add_argument("--kubectl", default="kubectl")
    args = parser.parse_args()
    kube = Kube(args.kubectl)
    engines = {}

    def stop_all(*_):
        running = [e.process for e in engines.values() if e.process and e.process.poll() is None]
        for process in running:
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.time() + GRACE
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    finished = set()
    while True:
        seen = set()
        for namespace in args.namespace:
            try:
                pods = kube.pods(namespace)
            except RuntimeError as e:
                log(str(e))
                continue
            for pod in pods:
                uid = pod["metadata"]["uid"]
                status = pod.get("status") or {}
                if pod["metadata"].get("deletionTimestamp"):
                    continue
                seen.add(uid)
                if uid in engines or uid in finished:
                    continue
                if status.get("phase") == "Running" and status.get("podIP"):
                    try:
                        engines[uid] = Engine(pod, args)
                    except (KeyError, StopIteration) as e:
                        log(f"{pod['metadata']['name']}: not an engine pod ({e})")
                        finished.add(uid)
        # Engines of deleted pods stop first, freeing their address for a
        # new pod that may get it.
        for uid in [u for u in engines if u not in seen]:
            engine = engines.pop(uid)
            log(f"{engine.namespace}/{engine.name}: deleted: stopping its engine")
            engine.stop()
        for uid in list(engines):
            engine = engines[uid]
            try:
                if not engine.tick(kube):
                    finished.add(uid)
                    del engines[uid]
            except RuntimeError as e:
                log(f"{engine.namespace}/{engine.name}: {e}")
        time.sleep(POLL)


if __name__ == "__main__":
    main()
