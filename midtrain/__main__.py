import sys

from midtrain.cli import main

sys.exit(main())
