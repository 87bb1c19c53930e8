"""Helm for the tests, through PyPI's helm-python-sdk (the Helm v4 library),
so no helm binary is needed.

  helm.py lint CHART [VALUES_JSON]
  helm.py template CHART RELEASE NAMESPACE [VALUES_JSON]       rendered manifest on stdout
  helm.py install KUBECONFIG CHART RELEASE NAMESPACE [VALUES_JSON]
  helm.py upgrade KUBECONFIG CHART RELEASE NAMESPACE [VALUES_JSON]
  helm.py uninstall KUBECONFIG RELEASE NAMESPACE

Exits 1 with the findings on stderr when lint reports errors or warnings.
"""
import json
import sys

import helm_python as helm


def values(args, i):
    return json.loads(args[i]) if len(args) > i else None


def main(args):
    cmd = args[0]
    if cmd == "lint":
        report = helm.lint(args[1], values(args, 2), strict=True)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        problems += [{"error": e} for e in report.get("errors", []) or []]
        for p in problems:
            print(f"lint: {p.get('path', '')}: {p['error']}", file=sys.stderr)
        return 1 if problems else 0
    if cmd == "template":
        chart = helm.Chart.load(args[1])
        rendered = chart.render(values(args, 4), name=args[2], namespace=args[3])
        for path, manifest in sorted(rendered.items()):
            if manifest.strip() and path.endswith((".yaml", ".yml")):
                print(f"---\n# {path}\n{manifest}")
        return 0
    if cmd == "install":
        cfg = helm.Config(kubeconfig_path=args[1], namespace=args[4])
        release = cfg.install(args[2], args[3], values(args, 5), namespace=args[4], timeout=60)
        print(json.dumps({"name": args[3], "status": release.get("info", {}).get("status")}))
        return 0
    if cmd == "upgrade":
        cfg = helm.Config(kubeconfig_path=args[1], namespace=args[4])
        release = cfg.upgrade(args[2], args[3], values(args, 5), namespace=args[4], timeout=60)
        print(json.dumps({"name": args[3], "status": release.get("info", {}).get("status")}))
        return 0
    if cmd == "uninstall":
        cfg = helm.Config(kubeconfig_path=args[1], namespace=args[3])
        cfg.uninstall(args[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
