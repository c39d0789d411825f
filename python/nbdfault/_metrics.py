"""``GET /metrics`` as Python values: the Prometheus text exposition parsed
into a dict, with a lookup by metric name and labels (label order in the
text is the exporter's, so tests should not spell series out by hand)."""

__all__ = ["Metrics", "parse_metrics"]


class Metrics(dict):
    """Every series: its text as printed (``name{label="v",...}``) →
    value (a float)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # series text → (name, labels), filled by parse_metrics.
        self._parsed = {}

    def series(self, name):
        """``[(labels, value), ...]`` of every series of ``name``."""
        return [
            (dict(labels), self[key])
            for key, (n, labels) in self._parsed.items()
            if n == name
        ]

    def value(self, name, **labels):
        """The sum over the series of ``name`` that carry every label
        given (0 when none does): ``value("nbdfault_faults_total",
        rule="eio")``."""
        return sum(
            v
            for have, v in self.series(name)
            if all(have.get(k) == str(want) for k, want in labels.items())
        )


def parse_metrics(text):
    """Parses Prometheus text exposition (version 0.0.4)."""
    m = Metrics()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, labels, rest = _split_series(line)
        key = line[: len(line) - len(rest)].rstrip()
        fields = rest.split()
        if not fields:
            raise ValueError(f"metrics line without a value: {line!r}")
        m[key] = float(fields[0])
        m._parsed[key] = (name, tuple(labels))
    return m


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _split_series(line):
    """``(name, [(label, value), ...], rest of the line)``."""
    i = 0
    while i < len(line) and line[i] not in "{ \t":
        i += 1
    name = line[:i]
    labels = []
    if i < len(line) and line[i] == "{":
        i += 1
        while True:
            while i < len(line) and line[i] in " ,":
                i += 1
            if i >= len(line):
                raise ValueError(f"unterminated labels: {line!r}")
            if line[i] == "}":
                i += 1
                break
            eq = line.index("=", i)
            label = line[i:eq].strip()
            if line[eq + 1 : eq + 2] != '"':
                raise ValueError(f"unquoted label value: {line!r}")
            i = eq + 2
            value = []
            while True:
                if i >= len(line):
                    raise ValueError(f"unterminated label value: {line!r}")
                c = line[i]
                if c == "\\" and i + 1 < len(line):
                    value.append(_ESCAPES.get(line[i + 1], "\\" + line[i + 1]))
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    value.append(c)
                    i += 1
            labels.append((label, "".join(value)))
    return name, labels, line[i:]
