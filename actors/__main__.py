"""`python -m actors`: patch for gevent before anything else is imported, then run the command line."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from actors.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
