"""The shipped experiment configs, installed with vlseg as the package ``vlseg.configs`` (``load_config`` finds a
bare name such as ``phantom`` or ``reference/sat_nano`` here), so library code never looks into a checkout."""
