"""fedmmkt's command line (installed as ``fedmmkt_cli``)."""
