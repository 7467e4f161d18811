"""``python -m tokenhive.broker --clients tcp://... --workers ipc://...``"""

import sys

from .command import main

sys.exit(main())
