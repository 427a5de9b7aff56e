from trackrelay.cli import main

raise SystemExit(main())
