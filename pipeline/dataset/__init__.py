"""From raw reviews to a k-core filtered, split interaction table: format readers (line-based and columnar), k-core,
splits, the MMRec folder format and its export."""
