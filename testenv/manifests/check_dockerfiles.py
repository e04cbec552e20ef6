#!/usr/bin/env python3
"""Structural checks of the three Dockerfiles (stdlib only): check_dockerfiles.py ROOT.

Prints `ok   ...` / `FAIL ...` lines (reasons indented below); lint-images counts them.
"""

import json
import os
import re
import sys

IMAGES = {
    # file: (must be multi-stage, what ENTRYPOINT runs)
    "Dockerfile.adapter": (True, "/usr/local/bin/flowgate-adapter"),
    "Dockerfile.provisioner": (True, "/usr/local/bin/flowgate"),
    "Dockerfile.mlflow": (True, "/usr/local/bin/flowgate-mlflow"),
}
failed = 0


def check(name, problems):
    global failed
    problems = [p for p in problems if p]
    if problems:
        failed += 1
        print(f"FAIL {name}")
        for p in problems:
            print(f"       - {p}")
    else:
        print(f"ok   {name}")


def instructions(path):
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if buf and line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(instrs):
    """[(from args, [instructions])] per stage."""
    result = []
    for ins, arg in instrs:
        if ins == "FROM":
            result.append((arg, []))
        elif result:
            result[-1][1].append((ins, arg))
    return result


def dockerignore(root):
    patterns = []
    with open(os.path.join(root, ".dockerignore")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line)
    return patterns


def ignored(path, patterns):
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, pre) for pre in prefixes):
            result = not neg
    return result


def main():
    root = sys.argv[1]
    patterns = dockerignore(root)
    with open(os.path.join(root, "Cargo.toml")) as f:
        m = re.search(r'^rust-version\s*=\s*"([0-9.]+)"', f.read(), re.M)
    rust_version = tuple(int(x) for x in m.group(1).split(".")) if m else (0,)
    with open(os.path.join(root, "testenv/mlflow/requirements/current.txt")) as f:
        m = re.search(r"^mlflow==([0-9.]+)", f.read(), re.M)
    mlflow_pin = m.group(1) if m else None

    for name, (multi, entry) in IMAGES.items():
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            check(f"{name} exists", ["missing"])
            continue
        instrs = instructions(path)
        st = stages(instrs)
        names = set()
        probs = []
        for frm, _ in st:
            words = frm.split()
            image = next((w for w in words if not w.startswith("--")), "")
            if len(words) >= 3 and words[-2].upper() == "AS":
                names.add(words[-1])
            if image in names:
                continue  # an earlier stage
            if "$" in image:
                probs.append(f"FROM {image}: an ARG cannot be checked")
                continue
            if "@sha256:" in image:
                continue
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag:
                probs.append(f"FROM {image}: untagged")
            elif tag == "latest":
                probs.append(f"FROM {image}: latest")
            elif not re.search(r"\d", tag) and not re.search(r"-debian\d+$", image.split(":")[0]):
                # distroless publishes no version tags: its image name pins the Debian
                # release (cc-debian12); pin by digest for reproducible builds
                probs.append(f"FROM {image}: the tag names no version")
        check(f"{name}: every FROM pinned (version tag or digest, no latest)", probs)

        check(f"{name}: multi-stage build (toolchain stays out of the final image)",
              [] if not multi or len(st) >= 2 else [f"{len(st)} stage(s)"])

        final = st[-1][1] if st else []
        users = [arg for ins, arg in final if ins == "USER"]
        probs = []
        if not users:
            probs.append("no USER in the final stage")
        else:
            m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
            if not m:
                probs.append(f"USER {users[-1]} is not numeric (Kubernetes runAsNonRoot needs a numeric UID)")
            elif int(m.group(1)) == 0:
                probs.append("USER is root")
            elif m.group(2) not in (None, "0"):
                probs.append(f"USER {users[-1]}: group should be 0 (OpenShift's arbitrary UIDs are in group 0)")
            elif m.group(1) != "1001":
                probs.append(f"USER {users[-1]}: all three images share UID 1001 (fetch writes what MLflow rewrites)")
        check(f"{name}: final stage runs as a numeric non-root USER in group 0", probs)

        eps = [arg for ins, arg in final if ins == "ENTRYPOINT"]
        probs = []
        if not eps:
            probs.append("no ENTRYPOINT")
        else:
            try:
                ep = json.loads(eps[-1])
                if entry not in ep:
                    probs.append(f"ENTRYPOINT {ep} does not run {entry}")
            except ValueError:
                probs.append(f"ENTRYPOINT {eps[-1]} is not in exec form (signals would go to a shell)")
        check(f"{name}: exec-form ENTRYPOINT running {os.path.basename(entry)}", probs)

        probs = []
        for ins, arg in instrs:
            if ins == "ADD":
                probs.append(f"ADD {arg}: use COPY")
            if ins in ("COPY", "ADD"):
                words = [w for w in arg.split() if not w.startswith("--")]
                if any(w.startswith("--from") for w in arg.split()):
                    continue
                for src in words[:-1]:
                    if not os.path.exists(os.path.join(root, src)):
                        probs.append(f"COPY {src}: not in the repository")
                    elif ignored(src, patterns):
                        probs.append(f"COPY {src}: excluded by .dockerignore")
            if ins == "RUN" and re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", arg):
                probs.append("RUN pipes a download into a shell")
        check(f"{name}: COPY sources exist and pass .dockerignore; no ADD, no curl | sh", probs)

        text = open(path).read()
        probs = []
        if name != "Dockerfile.mlflow":
            m = re.search(r"FROM rust:(\d+)\.(\d+)(?:\.(\d+))?", text)
            if not m:
                probs.append("no rust:<version> build stage")
            elif tuple(int(x or 0) for x in m.groups()) < rust_version:
                probs.append(f"rust {m.group(0)} is older than the workspace's rust-version {rust_version}")
            if "--locked" not in text:
                probs.append("cargo build without --locked")
            if "bookworm" not in text or "debian12" not in text:
                probs.append("build stage and runtime are not both Debian 12 (glibc)")
        else:
            if mlflow_pin and f"'{mlflow_pin}'" not in text:
                probs.append(f"the image does not assert mlflow {mlflow_pin} (testenv/mlflow/requirements/current.txt)")
            if "current.lock" not in text:
                probs.append("pip install without the lock (testenv/mlflow/requirements/current.lock)")
            if "HOME=/tmp" not in text:
                probs.append("HOME is not /tmp (read-only root filesystem)")
            if "g=u" not in text:
                probs.append("no chmod g=u for OpenShift's group 0")
        check(f"{name}: versions consistent with the workspace and the tests", probs)

    probs = []
    for must_out in ("target", ".cache", ".git", "testenv/k8s/bin", "testenv/browser/node_modules", "mlruns"):
        if not ignored(must_out, patterns):
            probs.append(f"{must_out} is sent to the build context")
    check(".dockerignore keeps target/, .cache/, .git/, test binaries and stores out of the context", probs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
