import os
import sys

# Make `import oracle` work from any test module.
sys.path.insert(0, os.path.dirname(__file__))
