#!/usr/bin/env python3
"""apt-mirror.py SUITE: print the URI apt uses for Debian SUITE's main component.

Reads /etc/apt/sources.list and /etc/apt/sources.list.d/ (one-line .list and deb822
.sources files), so testenv/images/build bootstraps from the mirror this machine's
apt already uses and no host name is written into the repository. Exit 1 if none.
"""
import glob, re, sys
suite = sys.argv[1] if len(sys.argv) > 1 else "bookworm"
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) + sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
for f in files:
    try:
        text = open(f).read()
    except OSError:
        continue
    if f.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
            if fields.get("enabled", ["yes"])[0] == "no":
                continue
            if "deb" in fields.get("types", []) and suite in fields.get("suites", []) and "main" in fields.get("components", []):
                print(fields["uris"][0]); sys.exit(0)
    else:
        for line in text.splitlines():
            p = line.split("#", 1)[0].split()
            if len(p) >= 4 and p[0] == "deb":
                if p[1].startswith("["):
                    while not p[1].endswith("]"): p.pop(1)
                    p.pop(1)
                if len(p) >= 4 and p[2] == suite and "main" in p[3:]:
                    print(p[1]); sys.exit(0)
sys.exit("no apt source for %s main" % suite)
