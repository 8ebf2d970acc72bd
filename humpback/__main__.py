from humpback.cli import main

raise SystemExit(main())
