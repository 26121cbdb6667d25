"""stalroute: a multi-protocol e-mail routing proxy on Twisted."""
