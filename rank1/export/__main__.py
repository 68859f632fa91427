import sys

from rank1.export.cli import main

sys.exit(main(sys.argv[1:]))
