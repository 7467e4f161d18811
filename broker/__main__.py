"""``python -m tokenhive.broker --clients tcp://... --workers ipc://...``"""

import sys

from tokenhive.broker.command import main

sys.exit(main())
